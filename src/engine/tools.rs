//! Tool calling: which syntax a model calls tools in, the prompt that tells it about the tools,
//! the grammar that forces a call (`tool_choice: required` or a named function), and the parser
//! that finds calls in the generated text.
//!
//! Syntaxes:
//! - **harmony** (gpt-oss): `<|channel|>commentary to=functions.NAME ... <|call|>`, parsed by
//!   [`super::harmony`]; the template renders the tools.
//! - **hermes** (Qwen 2.5/3, Hermes, SmolLM3 and other ChatML templates with tools):
//!   `<tool_call>\n{"name": .., "arguments": {..}}\n</tool_call>`; the template renders the tools.
//! - **llama3** (Llama 3.1+ JSON tool calling): the answer is one object
//!   `{"name": .., "parameters": {..}}`; the template renders the tools.
//! - **generic**: the template does not render tools (it ignores `tools`, e.g. SmolLM2): we add
//!   a system message that lists the tools and asks for the hermes form, and parse that.

use serde_json::{json, Value};

use super::chat_template::Message;
use super::structured::{json_layout, Grammar};

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments (an object schema).
    pub parameters: Value,
}

impl Tool {
    /// The OpenAI form templates read: `{"type": "function", "function": {..}}`.
    pub fn to_json(&self) -> Value {
        let mut f = json!({"name": self.name, "parameters": self.parameters});
        if let Some(d) = &self.description {
            f["description"] = d.clone().into();
        }
        json!({"type": "function", "function": f})
    }
}

/// Whether and which tools the model must call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// No call: the tools are not shown to the model.
    None,
    /// The model decides.
    Auto,
    /// At least one call of a listed tool (enforced by a grammar).
    Required,
    /// A call of this tool (enforced by a grammar).
    Named(String),
}

/// The tools of one request.
#[derive(Debug, Clone)]
pub struct ToolRequest {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// More than one call in one answer (OpenAI `parallel_tool_calls`, default true).
    pub parallel: bool,
}

impl ToolRequest {
    /// The tools the model sees and may call (`Named`: only that one is callable).
    fn callable(&self) -> Vec<&Tool> {
        match &self.choice {
            ToolChoice::Named(n) => self.tools.iter().filter(|t| &t.name == n).collect(),
            _ => self.tools.iter().collect(),
        }
    }

    /// Checks names and choice; the error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for t in &self.tools {
            if t.name.is_empty() {
                return Err("a tool has an empty function name".into());
            }
            if !seen.insert(&t.name) {
                return Err(format!("tool '{}' is listed twice", t.name));
            }
            if !t.parameters.is_object() {
                return Err(format!(
                    "the parameters of tool '{}' must be a JSON Schema object",
                    t.name
                ));
            }
        }
        match &self.choice {
            ToolChoice::Named(n) if !self.tools.iter().any(|t| &t.name == n) => Err(format!(
                "tool_choice names '{n}', which is not among the tools"
            )),
            ToolChoice::Required | ToolChoice::Named(_) if self.tools.is_empty() => {
                Err("tool_choice requires a tool call but no tools are given".into())
            }
            _ => Ok(()),
        }
    }
}

/// How a model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolSyntax {
    Harmony,
    Hermes,
    Llama3,
    Generic,
}

/// The syntax for a chat template (`source`) that renders tools (`renders_tools`).
pub fn syntax_for(harmony: bool, source: Option<&str>, renders_tools: bool) -> ToolSyntax {
    if harmony {
        return ToolSyntax::Harmony;
    }
    match source {
        Some(s) if renders_tools && s.contains("<tool_call>") => ToolSyntax::Hermes,
        Some(s) if renders_tools && (s.contains("<|python_tag|>") || s.contains("ipython")) => {
            ToolSyntax::Llama3
        }
        _ => ToolSyntax::Generic,
    }
}

/// The name of the tool a template probe lists, to see whether the template renders `tools`.
pub const PROBE_TOOL: &str = "xllm_probe_tool";

/// A tool list for probing a template.
pub fn probe_tools() -> Vec<Value> {
    vec![Tool {
        name: PROBE_TOOL.into(),
        description: Some("probe".into()),
        parameters: json!({"type": "object", "properties": {}}),
    }
    .to_json()]
}

/// The system text of the generic tool prompt.
pub fn generic_prompt(tools: &[&Tool]) -> String {
    let mut s = String::from(
        "You can call functions to answer. The functions, as JSON Schemas:\n<tools>\n",
    );
    for t in tools {
        s.push_str(&t.to_json().to_string());
        s.push('\n');
    }
    s.push_str(
        "</tools>\nTo call a function, answer with a JSON object holding its name and arguments \
         between tags, one pair of tags per call:\n<tool_call>\n{\"name\": \"<function name>\", \
         \"arguments\": {<arguments>}}\n</tool_call>",
    );
    s
}

/// Messages for a template in `syntax`: the generic form puts the tool list into the system
/// message, earlier calls into the assistant text and tool results into user turns (the
/// Hermes convention), since such a template knows nothing of tools.
pub fn prepare_messages(
    messages: &[Message],
    syntax: ToolSyntax,
    tools: &ToolRequest,
) -> Vec<Message> {
    if syntax != ToolSyntax::Generic {
        return messages.to_vec();
    }
    let mut out: Vec<Message> = Vec::with_capacity(messages.len() + 1);
    let shown = tools.callable();
    if tools.choice != ToolChoice::None && !shown.is_empty() {
        let prompt = generic_prompt(&shown);
        match messages.first() {
            Some(m) if m.role == "system" => {
                out.push(Message::new("system", format!("{}\n\n{prompt}", m.content)))
            }
            _ => out.push(Message::new("system", prompt)),
        }
    }
    let skip = usize::from(out.len() == 1 && messages.first().is_some_and(|m| m.role == "system"));
    for m in &messages[skip..] {
        match m.role.as_str() {
            "assistant" if m.tool_calls.is_some() => {
                let mut text = m.content.clone();
                for call in m.tool_calls.iter().flatten() {
                    let f = call.get("function").unwrap_or(call);
                    let body = json!({"name": f.get("name"), "arguments": f.get("arguments")});
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&format!("<tool_call>\n{body}\n</tool_call>"));
                }
                out.push(Message::new("assistant", text));
            }
            "tool" => out.push(Message::new(
                "user",
                format!("<tool_response>\n{}\n</tool_response>", m.content),
            )),
            _ => out.push(m.clone()),
        }
    }
    out
}

/// The JSON Schema of one call's body in `syntax` (`arguments` or `parameters` key).
fn call_schema(tools: &[&Tool], args_key: &str) -> Value {
    let variants: Vec<Value> = tools
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, args_key: t.parameters},
                "required": ["name", args_key],
                "additionalProperties": false,
            })
        })
        .collect();
    let mut schema = if variants.len() == 1 {
        variants.into_iter().next().unwrap_or(Value::Null)
    } else {
        json!({"anyOf": variants})
    };
    schema["x-guidance"] = json_layout();
    schema
}

/// The grammar that makes the answer a call (or, with `parallel`, calls) of the callable
/// tools, for `required` and named choices; `None` for `auto`/`none`.
pub fn forcing_grammar(syntax: ToolSyntax, tools: &ToolRequest) -> Result<Option<Grammar>, String> {
    if !matches!(tools.choice, ToolChoice::Required | ToolChoice::Named(_)) {
        return Ok(None);
    }
    let callable = tools.callable();
    match syntax {
        ToolSyntax::Harmony => Err(
            "tool_choice 'required' or a named function is not supported for harmony (gpt-oss) models yet; use 'auto'"
                .into(),
        ),
        ToolSyntax::Llama3 => Ok(Some(Grammar::JsonSchema(call_schema(&callable, "parameters")))),
        ToolSyntax::Hermes | ToolSyntax::Generic => {
            let schema = call_schema(&callable, "arguments");
            // A named function is called once; `required` with parallel calls allows up to
            // one call per listed tool (unbounded, small models repeat a call until
            // max_tokens).
            let most = match tools.choice {
                ToolChoice::Required if tools.parallel => tools.tools.len().max(1),
                _ => 1,
            };
            let calls = if most == 1 {
                "call".to_string()
            } else {
                format!("call{{1,{most}}}")
            };
            Ok(Some(Grammar::Lark(format!(
                "start: {calls}\ncall: \"<tool_call>\\n\" %json {schema} \"\\n</tool_call>\\n\"\n"
            ))))
        }
    }
}

/// Finds tool calls in generated text, token piece by piece.
#[derive(Debug)]
pub(crate) struct CallParser {
    syntax: ToolSyntax,
    buf: String,
    in_call: bool,
    /// llama3: undecided until the first non-space character (`{` holds the answer back).
    json_answer: Option<bool>,
    /// A call was found: whitespace between and after calls is layout, not answer text.
    after_call: bool,
}

/// A piece of parsed output: text, or a call (name, arguments as JSON text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    Text(String),
    Call(String, String),
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

impl CallParser {
    pub(crate) fn new(syntax: ToolSyntax) -> Self {
        Self {
            syntax,
            buf: String::new(),
            in_call: false,
            json_answer: None,
            after_call: false,
        }
    }

    /// Drops empty text, and whitespace-only text once a call was seen.
    fn tidy(&mut self, pieces: Vec<Piece>) -> Vec<Piece> {
        let mut out = Vec::with_capacity(pieces.len());
        for p in pieces {
            match p {
                Piece::Text(t) if t.is_empty() || (self.after_call && t.trim().is_empty()) => {}
                Piece::Call(..) => {
                    self.after_call = true;
                    out.push(p);
                }
                p => out.push(p),
            }
        }
        out
    }

    /// Adds generated text; returns what is complete.
    pub(crate) fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        if self.syntax == ToolSyntax::Llama3 {
            if self.json_answer.is_none() {
                let t = self.buf.trim_start();
                if let Some(c) = t.chars().next() {
                    self.json_answer = Some(c == '{');
                }
            }
            if self.json_answer == Some(false) {
                out.push(Piece::Text(std::mem::take(&mut self.buf)));
            }
            return out;
        }
        loop {
            if !self.in_call {
                if let Some(p) = self.buf.find(OPEN) {
                    out.push(Piece::Text(self.buf[..p].to_string()));
                    self.buf.drain(..p + OPEN.len());
                    self.in_call = true;
                    continue;
                }
                let keep = (1..OPEN.len().min(self.buf.len() + 1))
                    .rev()
                    .find(|&n| self.buf.ends_with(&OPEN[..n]))
                    .unwrap_or(0);
                let cut = self.buf.len() - keep;
                out.push(Piece::Text(self.buf[..cut].to_string()));
                self.buf.drain(..cut);
                break;
            }
            let Some(p) = self.buf.find(CLOSE) else {
                break;
            };
            let body = self.buf[..p].to_string();
            self.buf.drain(..p + CLOSE.len());
            self.in_call = false;
            out.push(
                parse_call(&body, "arguments")
                    .unwrap_or_else(|| Piece::Text(format!("{OPEN}{body}{CLOSE}"))),
            );
        }
        self.tidy(out)
    }

    /// The end of the answer: what was held back.
    pub(crate) fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.buf);
        let piece = match self.syntax {
            ToolSyntax::Llama3 if self.json_answer == Some(true) => {
                parse_call(&rest, "parameters").unwrap_or(Piece::Text(rest))
            }
            // A call whose closing tag never came (the model ended right after the JSON).
            _ if self.in_call => parse_call(&rest, "arguments")
                .unwrap_or_else(|| Piece::Text(format!("{OPEN}{rest}"))),
            _ => Piece::Text(rest),
        };
        self.in_call = false;
        self.tidy(vec![piece])
    }
}

/// `{"name": .., "<args_key>": {..}}` → a call (the arguments as compact JSON text).
fn parse_call(body: &str, args_key: &str) -> Option<Piece> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let args = v
        .get(args_key)
        .or_else(|| v.get("arguments"))
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    // Some models write the arguments as a JSON string.
    let args = match args {
        Value::String(s) if serde_json::from_str::<Value>(&s).is_ok_and(|v| v.is_object()) => s,
        other => other.to_string(),
    };
    Some(Piece::Call(name, args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(syntax: ToolSyntax, pieces: &[&str]) -> Vec<Piece> {
        let mut p = CallParser::new(syntax);
        let mut out: Vec<Piece> = Vec::new();
        for s in pieces {
            out.extend(p.push(s));
        }
        out.extend(p.finish());
        // Merge adjacent text for comparison.
        let mut merged: Vec<Piece> = Vec::new();
        for piece in out {
            match (merged.last_mut(), piece) {
                (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
                (_, p) => merged.push(p),
            }
        }
        merged
    }

    #[test]
    fn hermes_calls_split_across_pieces_are_found() {
        let out = feed(
            ToolSyntax::Hermes,
            &[
                "Sure. <tool",
                "_call>\n{\"name\": \"get_weather\", ",
                "\"arguments\": {\"city\": \"Paris\"}}\n</tool_",
                "call>\n<tool_call>{\"name\":\"b\",\"arguments\":{}}</tool_call>",
            ],
        );
        assert_eq!(
            out,
            vec![
                Piece::Text("Sure. ".into()),
                Piece::Call("get_weather".into(), "{\"city\":\"Paris\"}".into()),
                Piece::Call("b".into(), "{}".into()),
            ]
        );
    }

    #[test]
    fn unparsable_calls_stay_text_and_plain_text_passes() {
        assert_eq!(
            feed(
                ToolSyntax::Generic,
                &["a < b", " <tool_call>oops</tool_call>"]
            ),
            vec![Piece::Text("a < b <tool_call>oops</tool_call>".into())]
        );
        assert_eq!(
            feed(
                ToolSyntax::Generic,
                &["<tool_call>{\"name\": \"f\", \"arguments\": {\"x\": 1}}"]
            ),
            vec![Piece::Call("f".into(), "{\"x\":1}".into())],
            "a call the model ended without its closing tag"
        );
    }

    #[test]
    fn llama3_json_answer_is_a_call_and_text_streams() {
        assert_eq!(
            feed(
                ToolSyntax::Llama3,
                &[" {\"name\": \"f\", ", "\"parameters\": {\"a\": \"b\"}}"]
            ),
            vec![Piece::Call("f".into(), "{\"a\":\"b\"}".into())]
        );
        let mut p = CallParser::new(ToolSyntax::Llama3);
        assert_eq!(p.push("Hello"), vec![Piece::Text("Hello".into())]);
    }

    #[test]
    fn choices_are_checked_and_grammars_name_the_tools() {
        let tools = ToolRequest {
            tools: vec![Tool {
                name: "f".into(),
                description: None,
                parameters: json!({"type": "object", "properties": {"x": {"type": "integer"}}}),
            }],
            choice: ToolChoice::Named("g".into()),
            parallel: false,
        };
        assert!(tools.validate().unwrap_err().contains("'g'"));
        let ok = ToolRequest {
            choice: ToolChoice::Required,
            ..tools.clone()
        };
        ok.validate().unwrap();
        let Some(Grammar::Lark(g)) = forcing_grammar(ToolSyntax::Generic, &ok).unwrap() else {
            panic!("a lark grammar")
        };
        assert!(
            g.starts_with("start: call\n") && g.contains("\"const\":\"f\""),
            "{g}"
        );
        assert!(forcing_grammar(ToolSyntax::Harmony, &ok).is_err());
        let auto = ToolRequest {
            choice: ToolChoice::Auto,
            ..tools
        };
        assert_eq!(forcing_grammar(ToolSyntax::Hermes, &auto).unwrap(), None);
    }
}
