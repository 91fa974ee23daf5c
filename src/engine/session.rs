//! The one way to open a model: resolve the name, check the quantization profile against the
//! format and the device, plan memory, load — once — and keep what was read (tokenizer,
//! template, generation defaults, harmony control tokens) for every command that runs it
//! (`run`, `bench`, `perplexity`, `serve`).

use std::sync::{Arc, OnceLock};

use anyhow::Context;

use super::chat_template::Message;
use super::harmony::{harmony_specials, ReasoningEffort};
use super::load::{self, LoadOptions, LoadedModel};
use super::postprocess::HarmonySpecials;
use super::request::OutputMode;
use super::structured::{Constraint, Grammar, GrammarCompiler};
use super::think::ThinkTags;
use super::tools::{ToolChoice, ToolRequest, ToolSyntax};
use crate::arch::ModelInfo;
use crate::model::inspect::ModelMetadata;
use crate::quant::KvProfile;
use crate::store::ResolvedModel;

/// Context allocated per sequence when neither the caller nor a smaller model limit says
/// otherwise.
pub const DEFAULT_CTX: usize = 4096;

/// How to open a model.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// `--device` (`cpu`, `cuda[:N]`, `metal`, `auto`); `None`: the default choice.
    pub device: Option<String>,
    /// Tokens per sequence (`--ctx`); `None`: the model's limit capped at [`DEFAULT_CTX`].
    pub ctx: Option<usize>,
    /// `xllm imatrix`: collect the matmuls' input activations here.
    pub activation_stats: Option<Arc<crate::kernels::act_stats::ActivationStats>>,
}

/// An opened model, ready for the scheduler and the front ends.
pub struct ModelSession {
    pub resolved: ResolvedModel,
    pub loaded: LoadedModel,
    /// Tokens one sequence may hold.
    pub context: usize,
    /// The harmony control tokens, for gpt-oss-style models.
    pub harmony: Option<HarmonySpecials>,
    /// Grammar compiler for structured output, built on first use (its token trie takes a
    /// moment for large vocabularies); the error when the vocabulary does not allow one.
    grammars: OnceLock<Result<Arc<GrammarCompiler>, String>>,
    /// How the model writes tool calls (found from its template on first use).
    tool_syntax: OnceLock<ToolSyntax>,
    /// The `<think>`/`</think>` tokens, for models whose template reasons in them (Nemotron).
    pub think: Option<ThinkTags>,
}

/// Resolves `name` (store model `org/name[:token]`, a local folder, a `.gguf` file) and opens it.
pub fn open(name: &str, options: &OpenOptions) -> anyhow::Result<ModelSession> {
    let opened = crate::store::open_model(name)?;
    open_with(opened.resolved(), Some(&opened.metadata), options)
}

/// Opens a model that is already resolved to files on disk.
pub fn open_resolved(
    resolved: ResolvedModel,
    options: &OpenOptions,
) -> anyhow::Result<ModelSession> {
    open_with(resolved, None, options)
}

fn open_with(
    resolved: ResolvedModel,
    metadata: Option<&ModelMetadata>,
    options: &OpenOptions,
) -> anyhow::Result<ModelSession> {
    // A KV profile the device cannot run is refused before anything is opened or loaded
    // (checked again once `auto` has picked a device).
    if let Some(spec) = options.device.as_deref() {
        let request: crate::device::DeviceRequest = spec.parse()?;
        crate::state::kv_quant::check_kv_profile_on_request(resolved.kv_profile, request)?;
    }
    let device = crate::device::select_device(options.device.as_deref())?;
    crate::state::kv_quant::check_kv_profile_on_device(resolved.kv_profile, device.location())?;
    match metadata {
        Some(meta) => crate::engine::memory_plan::ensure_fits_with(
            &resolved,
            meta,
            &device,
            options.ctx,
            DEFAULT_CTX,
        )?,
        None => {
            crate::engine::memory_plan::ensure_fits(&resolved, &device, options.ctx, DEFAULT_CTX)?
        }
    }
    let load_options = LoadOptions {
        device,
        activation_stats: options.activation_stats.clone(),
        ..LoadOptions::default()
    };
    let loaded = load::load(&resolved, &load_options)
        .with_context(|| format!("cannot load model '{}'", resolved.display_name))?;
    let context = context_size(loaded.model.info(), options.ctx)?;
    let harmony = harmony_specials(&loaded).map(Arc::new);
    let think = match harmony {
        Some(_) => None,
        None => ThinkTags::detect(&loaded.tokenizer, loaded.tokenizer.chat_template.as_deref()),
    };
    Ok(ModelSession {
        resolved,
        loaded,
        context,
        harmony,
        grammars: OnceLock::new(),
        tool_syntax: OnceLock::new(),
        think,
    })
}

/// The context to allocate: `ctx`, else the model's limit capped at [`DEFAULT_CTX`].
pub fn context_size(info: &ModelInfo, ctx: Option<usize>) -> anyhow::Result<usize> {
    let model_ctx = info.context_length;
    match ctx {
        Some(0) => anyhow::bail!("--ctx must be at least 1"),
        Some(n) if n > model_ctx => {
            anyhow::bail!("--ctx {n} exceeds the model's context length of {model_ctx} tokens")
        }
        Some(n) => Ok(n),
        None => Ok(model_ctx.min(DEFAULT_CTX)),
    }
}

/// How a conversation becomes prompt tokens.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChatOptions {
    /// Ignore the chat template: the messages' text joined by newlines (BOS added).
    pub raw: bool,
    /// Harmony models: how much to reason (the template's `reasoning_effort`).
    pub reasoning_effort: ReasoningEffort,
    /// `<think>` models: reason before answering (the template's `enable_thinking`); `None`:
    /// the template's default.
    pub thinking: Option<bool>,
}

impl ModelSession {
    pub fn info(&self) -> &ModelInfo {
        self.loaded.model.info()
    }

    pub fn kv_profile(&self) -> KvProfile {
        self.resolved.kv_profile
    }

    pub fn display_name(&self) -> &str {
        &self.resolved.display_name
    }

    /// A fresh per-sequence constraint for `grammar` (errors name what is unsupported).
    pub fn compile(&self, grammar: &Grammar) -> anyhow::Result<Constraint> {
        let compiler = self.grammars.get_or_init(|| {
            GrammarCompiler::new(&self.loaded.tokenizer, self.info().vocab_size)
                .map(Arc::new)
                .map_err(|e| format!("{e:#}"))
        });
        match compiler {
            Ok(c) => c.compile(grammar),
            Err(e) => anyhow::bail!("{e}"),
        }
    }

    /// How generated tokens are read: harmony (gpt-oss), `<think>` reasoning (open when the
    /// template's generation prompt left it open), or plain text.
    pub fn output_mode(&self) -> OutputMode {
        self.output_mode_for(&[])
    }

    /// [`Self::output_mode`] for a generation that continues `prompt`.
    pub fn output_mode_for(&self, prompt: &[u32]) -> OutputMode {
        if self.harmony.is_some() {
            OutputMode::Harmony
        } else if let Some(tags) = &self.think {
            OutputMode::Think {
                reasoning: tags.open_at_end(prompt),
            }
        } else {
            OutputMode::Text
        }
    }

    /// How this model writes tool calls: harmony for gpt-oss, else read from its chat template
    /// (rendered once with a probe tool to see whether it shows `tools` at all).
    pub fn tool_syntax(&self) -> ToolSyntax {
        *self.tool_syntax.get_or_init(|| {
            let template = self.loaded.template.as_ref();
            let renders = template.is_some_and(|t| {
                let extra = minijinja::context! {
                    tools => super::tools::probe_tools(),
                    reasoning_effort => ReasoningEffort::Medium.as_str(),
                };
                t.render_with(&[Message::new("user", "hi")], true, extra)
                    .is_ok_and(|text| text.contains(super::tools::PROBE_TOOL))
            });
            super::tools::syntax_for(
                self.harmony.is_some(),
                template.map(|t| t.source()),
                renders,
            )
        })
    }

    /// The constraint that forces a tool call (`tool_choice` required or named), if any.
    pub fn tool_constraint(&self, tools: &ToolRequest) -> anyhow::Result<Option<Constraint>> {
        match super::tools::forcing_grammar(self.tool_syntax(), tools)
            .map_err(|e| anyhow::anyhow!(e))?
        {
            Some(grammar) => self.compile(&grammar).map(Some),
            None => Ok(None),
        }
    }

    /// Whether the model can reason before answering (harmony or `<think>` models).
    pub fn can_think(&self) -> bool {
        self.harmony.is_some() || self.think.is_some()
    }

    /// Prompt tokens for a conversation, ending with the assistant's turn opening: the chat
    /// template (harmony with `reasoning_effort` for gpt-oss, `enable_thinking` for `<think>`
    /// models), or raw text.
    pub fn chat_prompt(
        &self,
        messages: &[Message],
        options: ChatOptions,
    ) -> anyhow::Result<Vec<u32>> {
        self.chat_prompt_with_tools(messages, options, None)
    }

    /// Like [`Self::chat_prompt`], with the request's tools shown to the model: through the
    /// template's `tools` variable where it renders them, else as the generic tool prompt.
    pub fn chat_prompt_with_tools(
        &self,
        messages: &[Message],
        options: ChatOptions,
        tools: Option<&ToolRequest>,
    ) -> anyhow::Result<Vec<u32>> {
        let tokenizer = &self.loaded.tokenizer;
        let shown = tools.filter(|t| t.choice != ToolChoice::None && !t.tools.is_empty());
        let prepared;
        let (messages, tool_list) = match shown {
            Some(t) => {
                let syntax = self.tool_syntax();
                prepared = super::tools::prepare_messages(messages, syntax, t);
                let list: Vec<serde_json::Value> = if syntax == ToolSyntax::Generic {
                    Vec::new()
                } else {
                    t.tools.iter().map(|t| t.to_json()).collect()
                };
                (prepared.as_slice(), list)
            }
            None => (messages, Vec::new()),
        };
        let tools_value = (!tool_list.is_empty()).then_some(tool_list);
        match (&self.loaded.template, options.raw) {
            (Some(template), false) => {
                let text = if self.harmony.is_some() {
                    let extra = minijinja::context! {
                        reasoning_effort => options.reasoning_effort.as_str(),
                        tools => tools_value,
                    };
                    template.render_with(messages, true, extra)?
                } else if tools_value.is_some()
                    || (self.think.is_some() && options.thinking.is_some())
                {
                    let thinking = self.think.and(options.thinking);
                    let extra = match thinking {
                        Some(on) => {
                            minijinja::context! { tools => tools_value, enable_thinking => on }
                        }
                        None => minijinja::context! { tools => tools_value },
                    };
                    template.render_with(messages, true, extra)?
                } else {
                    template.render(messages, true)?
                };
                tokenizer.encode(&text, false)
            }
            (None, false) if self.harmony.is_some() => {
                anyhow::bail!("this gpt-oss model has no chat template (chat_template.jinja)")
            }
            _ => {
                let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
                tokenizer.encode(&text.join("\n"), true)
            }
        }
    }
}
