//! Chat templates (Jinja, as shipped in tokenizer_config.json / chat_template.jinja) rendered with
//! minijinja plus the Hugging Face extensions templates rely on: `raise_exception`,
//! `strftime_now`, `tojson` and Python string/dict methods (minijinja-contrib pycompat).

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| {
            chrono::Local::now().format(&format).to_string()
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| anyhow::anyhow!("the model's chat template does not parse: {e}"))?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
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
        let template = self.env.get_template("chat").expect("template was added");
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
                ..extra
            })
            .map_err(|e| anyhow::anyhow!("cannot render the chat template: {e}"))
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
}
