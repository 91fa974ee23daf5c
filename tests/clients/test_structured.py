"""Structured output and tool calling of `xllm serve`, checked through the official `openai` and
`ollama` clients with a real JSON Schema validator (`jsonschema`).

Usage: python tests/clients/test_structured.py XLLM_BINARY SMOLLM2_GGUF [--prompts N] [--report FILE]

SmolLM2-135M cannot write schema-valid JSON or tool calls unaided; under the grammar every answer
must parse and validate. Prompts x schemas run 4 at a time (so the constraints share continuous
batches). Answers cut by max_tokens (`finish_reason: length`) are counted apart and must stay
rare. Run by tests/serve_clients.rs with a few prompts; `--prompts 50` is the full check
(500 schema answers, 100 forced tool calls) whose numbers docs/structured-output.md reports.
"""

import argparse
import concurrent.futures
import json
import os
import sys
import time

import jsonschema
import ollama
import openai

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_clients import KEY, check, expect_error, start_server  # noqa: E402

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.com$"},
        },
        "required": ["name", "age", "email"],
        "additionalProperties": False,
    },
    "nested_address": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "address": {
                "type": "object",
                "properties": {
                    "street": {"type": "string", "maxLength": 50},
                    "city": {"type": "string", "maxLength": 30},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["street", "city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "tags_array": {
        "type": "object",
        "properties": {
            "topic": {"type": "string", "maxLength": 40},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 5},
        },
        "required": ["topic", "tags"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
            "sentiment": {"enum": ["positive", "neutral", "negative"]},
        },
        "required": ["color", "size", "sentiment"],
        "additionalProperties": False,
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "temperature": {"type": "number", "minimum": -50, "maximum": 60},
            "humidity": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
            "wind_kmh": {"type": "integer", "minimum": 0, "maximum": 300},
            "pressure_hpa": {"type": "number", "minimum": 870.5, "maximum": 1085.25},
        },
        "required": ["temperature", "humidity", "wind_kmh", "pressure_hpa"],
        "additionalProperties": False,
    },
    "product": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "title": {"type": "string", "maxLength": 60},
            "price": {"type": "number", "minimum": 0, "maximum": 10000},
            "in_stock": {"type": "boolean"},
            "categories": {
                "type": "array",
                "items": {"enum": ["books", "toys", "food", "tools", "music"]},
                "maxItems": 3,
            },
        },
        "required": ["id", "title", "price", "in_stock", "categories"],
        "additionalProperties": False,
    },
    "event": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "date": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"},
            "attendees": {
                "type": "array",
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 30},
                        "role": {"enum": ["host", "guest", "speaker"]},
                    },
                    "required": ["name", "role"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["title", "date", "attendees"],
        "additionalProperties": False,
    },
    "recipe": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "ingredients": {
                "type": "array",
                "minItems": 1,
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {
                        "item": {"type": "string", "maxLength": 25},
                        "grams": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                    "required": ["item", "grams"],
                    "additionalProperties": False,
                },
            },
            "vegetarian": {"type": "boolean"},
        },
        "required": ["name", "ingredients", "vegetarian"],
        "additionalProperties": False,
    },
    "scores": {
        "type": "object",
        "properties": {
            "player": {"type": "string", "pattern": "^[A-Z][a-z]{1,15}$"},
            "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                       "minItems": 3, "maxItems": 3},
            "average": {"type": "number", "minimum": 0, "maximum": 100},
        },
        "required": ["player", "scores", "average"],
        "additionalProperties": False,
    },
    "status_union": {
        "type": "object",
        "properties": {
            "status": {"enum": ["ok", "error", "pending"]},
            "code": {"type": "integer", "minimum": 100, "maximum": 599},
            "message": {"anyOf": [{"type": "string", "maxLength": 50}, {"type": "null"}]},
            "retry_after": {"type": ["integer", "null"], "minimum": 0, "maximum": 3600},
        },
        "required": ["status", "code", "message"],
        "additionalProperties": False,
    },
}

PROMPTS = [
    "Describe a person you might meet at a train station.",
    "Tell me about the weather in Oslo today.",
    "Write down details of a new product for an online shop.",
    "Plan a small birthday party.",
    "Give me a simple pasta recipe.",
    "Report the result of a web request.",
    "Summarize a football match.",
    "Invent a fictional character for a novel.",
    "What is a good name for a cat?",
    "Describe a sunny day at the beach.",
    "List facts about the planet Mars.",
    "Create a profile for a software engineer.",
    "Describe a rainy afternoon in London.",
    "Tell me about a famous painting.",
    "Suggest a gift for a child.",
    "Describe your favorite fruit.",
    "Write about a trip to the mountains.",
    "Give the details of a library book.",
    "Describe a small village in France.",
    "Tell me about a music concert.",
    "Create a shopping list for a picnic.",
    "Describe a busy restaurant kitchen.",
    "What happened at the science fair?",
    "Describe a new smartphone.",
    "Tell me about a basketball player.",
    "Describe a cold winter morning.",
    "Plan a meeting with a client.",
    "Give me a breakfast idea.",
    "Describe an old castle.",
    "Tell me about a rescue dog.",
    "Report a server outage.",
    "Describe a garden in spring.",
    "Write details for a bicycle for sale.",
    "Describe a student starting university.",
    "Tell me about a chess tournament.",
    "Describe the ocean at night.",
    "Give information about a hotel room.",
    "Describe a robot that helps at home.",
    "Tell me about a bakery.",
    "What is the status of my order?",
    "Describe a long train journey.",
    "Tell me about a volcano.",
    "Describe a teacher's day.",
    "Plan a weekend hiking trip.",
    "Describe a new video game.",
    "Tell me about a marathon runner.",
    "Describe a storm at sea.",
    "Give the details of a concert ticket.",
    "Describe a city park in autumn.",
    "Tell me something about penguins.",
]

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "search_web",
        "description": "Search the web",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "maxLength": 60},
            "max_results": {"type": "integer", "minimum": 1, "maximum": 10}},
            "required": ["query"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add_numbers",
        "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"], "additionalProperties": False}}},
]
TOOL_PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

VALIDATOR = jsonschema.Draft202012Validator


def one_schema_answer(client, prompt, name, schema, seed):
    r = client.chat.completions.create(
        model="smol",
        messages=[{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": prompt}],
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
        max_tokens=300,
        temperature=0.8 if seed % 2 else 0.0,
        seed=seed,
    )
    c = r.choices[0]
    if c.finish_reason == "length":
        return "length", c.message.content
    try:
        value = json.loads(c.message.content)
    except ValueError as e:
        return "invalid", f"{c.message.content!r}: {e}"
    errors = list(VALIDATOR(schema).iter_errors(value))
    if errors:
        return "invalid", f"{c.message.content!r}: {errors[0].message}"
    return "ok", c.message.content


def one_tool_call(client, prompt, choice, seed):
    r = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": prompt}],
        tools=TOOLS,
        tool_choice=choice,
        parallel_tool_calls=False,
        max_tokens=160,
        temperature=0.8 if seed % 2 else 0.0,
        seed=seed,
    )
    c = r.choices[0]
    if c.finish_reason == "length":
        return "length", str(c.message)
    calls = c.message.tool_calls or []
    if c.finish_reason != "tool_calls" or len(calls) != 1:
        return "invalid", f"finish {c.finish_reason}, calls {calls!r}, content {c.message.content!r}"
    call = calls[0]
    want = choice["function"]["name"] if isinstance(choice, dict) else None
    if call.function.name not in TOOL_PARAMS or (want and call.function.name != want):
        return "invalid", f"called {call.function.name!r}"
    try:
        args = json.loads(call.function.arguments)
    except ValueError as e:
        return "invalid", f"arguments {call.function.arguments!r}: {e}"
    errors = list(VALIDATOR(TOOL_PARAMS[call.function.name]).iter_errors(args))
    if errors:
        return "invalid", f"arguments {args!r}: {errors[0].message}"
    return "ok", f"{call.function.name}({call.function.arguments})"


def run_all(jobs, fn, workers):
    counts = {"ok": 0, "length": 0, "invalid": 0}
    failures = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(fn, *job): job for job in jobs}
        for f in concurrent.futures.as_completed(futures):
            status, detail = f.result()
            print(f"result: {fn.__name__} {status}", flush=True)
            counts[status] += 1
            if status != "ok":
                failures.append((futures[f], status, detail))
    return counts, failures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("gguf")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--report")
    ap.add_argument("--workers", type=int, default=4, help="concurrent requests (and server --parallel)")
    args = ap.parse_args()
    prompts = PROMPTS[: args.prompts]

    env = dict(os.environ)
    env.setdefault("RAYON_NUM_THREADS", "2")
    for k in ["XLLM_API_KEY", "XLLM_HOST", "XLLM_PORT"]:
        env.pop(k, None)
    proc, base, logs = start_server(args.binary, ["--model", f"smol={args.gguf}", "--api-key", KEY,
                                                  "--parallel", str(args.workers)], env)
    report = {}
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)

        # Errors come before any generation, naming what is wrong.
        e = expect_error(openai.BadRequestError, lambda: client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "array", "uniqueItems": True}}}), "an unsupported schema keyword is a 400")
        check("uniqueItems" in str(e.body), f"the error names the keyword: {e.body}")
        expect_error(openai.BadRequestError, lambda: client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}}), "an unknown named tool is a 400")

        # json_object: any object, streamed and not, same text at temperature 0.
        msgs = [{"role": "user", "content": "Describe a dog."}]
        r = client.chat.completions.create(model="smol", messages=msgs, response_format={"type": "json_object"},
                                           max_tokens=200, temperature=0)
        check(isinstance(json.loads(r.choices[0].message.content), dict), "json_object answer is a JSON object")
        pieces = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
            model="smol", messages=msgs, response_format={"type": "json_object"}, max_tokens=200,
            temperature=0, stream=True) if ch.choices]
        check("".join(pieces) == r.choices[0].message.content, "streamed json_object equals the non-streamed one")
        check(r.choices[0].finish_reason == "stop", "the grammar's end is finish_reason stop")

        t0 = time.time()
        jobs = [(client, p, name, schema, i * 100 + j)
                for i, p in enumerate(prompts) for j, (name, schema) in enumerate(SCHEMAS.items())]
        counts, failures = run_all(jobs, one_schema_answer, args.workers)
        report["schemas"] = {"answers": len(jobs), **counts, "seconds": round(time.time() - t0, 1)}
        for job, status, detail in failures:
            print(f"{status}: schema {job[2]} prompt {job[1]!r}: {detail}")
        check(counts["invalid"] == 0, f"every schema answer parses and validates: {counts}")
        check(counts["length"] <= max(1, len(jobs) // 20), f"answers cut by max_tokens stay rare: {counts}")

        t0 = time.time()
        tool_jobs = [(client, p, "required", i) for i, p in enumerate(prompts)]
        tool_jobs += [(client, p, {"type": "function", "function": {"name": TOOLS[i % 3]["function"]["name"]}}, i)
                      for i, p in enumerate(prompts)]
        counts, failures = run_all(tool_jobs, one_tool_call, args.workers)
        report["tools"] = {"requests": len(tool_jobs), **counts, "seconds": round(time.time() - t0, 1)}
        for job, status, detail in failures:
            print(f"{status}: tool_choice {job[2]} prompt {job[1]!r}: {detail}")
        check(counts["invalid"] == 0, f"every forced tool call is a listed tool with valid arguments: {counts}")
        check(counts["length"] <= max(1, len(tool_jobs) // 20), f"tool calls cut by max_tokens stay rare: {counts}")

        # Streamed tool calls, merged by the SDK's stream helper.
        with client.chat.completions.stream(
                model="smol", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=160,
                temperature=0) as s:
            final = s.get_final_completion()
        calls = final.choices[0].message.tool_calls
        check(final.choices[0].finish_reason == "tool_calls" and len(calls) == 1
              and calls[0].function.name == "get_weather" and calls[0].id,
              f"the stream helper merges the streamed call: {calls}")
        VALIDATOR(TOOL_PARAMS["get_weather"]).validate(json.loads(calls[0].function.arguments))
        # The answer to a call goes back as a tool message; the model answers in text.
        follow = client.chat.completions.create(model="smol", max_tokens=30, temperature=0, tools=TOOLS, messages=[
            {"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
            {"role": "tool", "tool_call_id": calls[0].id, "content": "{\"temperature\": 21}"}])
        check(follow.choices[0].message.content is not None, "a conversation with a tool result renders and answers")

        # Ollama: format "json", a schema, and tools with arguments as objects.
        oc = ollama.Client(host=base, headers={"Authorization": f"Bearer {KEY}"})
        schema = SCHEMAS["enums"]
        g = oc.chat(model="smol", messages=[{"role": "user", "content": "Pick a color."}], format=schema,
                    options={"temperature": 0, "num_predict": 100})
        VALIDATOR(schema).validate(json.loads(g.message.content))
        check(True, "ollama format=<schema> answer validates")
        g = oc.generate(model="smol", prompt="Describe a cat.", format="json",
                        options={"temperature": 0, "num_predict": 200})
        check(isinstance(json.loads(g.response), dict), "ollama format=json answer is an object")
        shown = oc.show("smol")
        check("tools" in (shown.capabilities or []), "show lists the tools capability")
    except BaseException:
        print("\n".join(logs[-40:]), file=sys.stderr)
        raise
    finally:
        proc.terminate()
        proc.wait(60)
    print(json.dumps(report))
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    print("all structured output checks passed")


if __name__ == "__main__":
    main()
