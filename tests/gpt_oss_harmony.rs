//! The fixture's harmony chat template rendered the way the engine renders templates (minijinja +
//! pycompat + strftime_now), and a harmony turn parsed back.

use minijinja::{context, Environment, Error, ErrorKind};
use xllm::engine::harmony::{parse_turn, StopReason};

fn render(ctx: minijinja::Value) -> Result<String, Error> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/gpt_oss_tiny/chat_template.jinja"
    );
    let source = std::fs::read_to_string(path).unwrap();
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("strftime_now", |fmt: String| {
        chrono::Local::now().format(&fmt).to_string()
    });
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", &source)?;
    env.get_template("chat")?.render(ctx)
}

#[test]
fn prior_reasoning_is_dropped_and_effort_is_rendered() {
    let messages = serde_json::json!([
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "thinking": "SECRET-REASONING", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"}
    ]);
    let out = render(context! {
        messages => minijinja::Value::from_serialize(&messages),
        add_generation_prompt => true,
        reasoning_effort => "high",
    })
    .unwrap();
    let today = chrono::Local::now().format("%Y-%m-%d").to_string();
    assert!(
        out.starts_with("<|start|>system<|message|>You are ChatGPT"),
        "{out}"
    );
    assert!(out.contains(&format!("Current date: {today}")), "{out}");
    assert!(out.contains("Reasoning: high"), "{out}");
    assert!(
        out.contains("<|start|>developer<|message|># Instructions\n\nAnswer briefly."),
        "{out}"
    );
    assert!(
        out.contains("<|start|>assistant<|channel|>final<|message|>Hello!<|end|>"),
        "{out}"
    );
    assert!(
        !out.contains("SECRET-REASONING"),
        "prior reasoning must not be fed back: {out}"
    );
    assert!(
        out.ends_with("<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant"),
        "{out}"
    );
}

#[test]
fn tools_identity_and_builtin_tools_render() {
    let tools = serde_json::json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "required": ["city"], "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["c", "f"]}
            }}
        }
    }]);
    let messages = serde_json::json!([{"role": "user", "content": "Weather in Paris?"}]);
    let out = render(context! {
        messages => minijinja::Value::from_serialize(&messages),
        tools => minijinja::Value::from_serialize(&tools),
        builtin_tools => vec!["python"],
        model_identity => "You are a test model.",
        add_generation_prompt => true,
    })
    .unwrap();
    assert!(
        out.starts_with("<|start|>system<|message|>You are a test model."),
        "{out}"
    );
    assert!(out.contains("Reasoning: medium"), "default effort: {out}");
    assert!(out.contains("## python"), "{out}");
    assert!(out.contains("type get_weather = (_: {\n// City name\ncity: string,\nunit?: \"c\" | \"f\",\n}) => any;"), "{out}");
    assert!(
        out.contains("Calls to these tools must go to the commentary channel: 'functions'."),
        "{out}"
    );
}

#[test]
fn generated_turn_parses_into_thinking_and_answer() {
    // A turn as the tiny model's tokenizer would deliver it: specials whole, text in pieces.
    let pieces = [
        "<|channel|>",
        "analysis",
        "<|message|>",
        "Add ",
        "two.",
        "<|end|>",
        "<|start|>",
        "assistant",
        "<|channel|>",
        "final",
        "<|message|>",
        "4",
        "<|return|>",
    ];
    let turn = parse_turn(pieces);
    assert_eq!(turn.thinking, "Add two.");
    assert_eq!(turn.answer, "4");
    assert_eq!(turn.stop, Some(StopReason::Return));
}
