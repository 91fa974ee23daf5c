# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_xllm_global_optspecs
    string join \n h/help V/version
end

function __fish_xllm_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_xllm_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_xllm_using_subcommand
    set -l cmd (__fish_xllm_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c xllm -n "__fish_xllm_needs_command" -s h -l help -d 'Print help'
complete -c xllm -n "__fish_xllm_needs_command" -s V -l version -d 'Print version'
complete -c xllm -n "__fish_xllm_needs_command" -f -a "pull" -d 'Download a model from the Hugging Face Hub into the store (resumable, verified)'
complete -c xllm -n "__fish_xllm_needs_command" -f -a "list" -d 'List the models in the store'
complete -c xllm -n "__fish_xllm_needs_command" -f -a "show" -d 'Show a model\'s architecture, parameters, quantization and files'
complete -c xllm -n "__fish_xllm_needs_command" -f -a "rm" -d 'Remove models from the store (partial downloads included)'
complete -c xllm -n "__fish_xllm_needs_command" -f -a "run" -d 'Chat with a model (REPL), or answer one prompt and exit'
complete -c xllm -n "__fish_xllm_needs_command" -f -a "serve" -d 'Serve models over HTTP: OpenAI- and Ollama-compatible APIs on the batching engine'
complete -c xllm -n "__fish_xllm_needs_command" -f -a "perplexity" -d 'Measure perplexity of a model on a text file'
complete -c xllm -n "__fish_xllm_needs_command" -f -a "bench" -d 'Measure prefill and decode speed (tokens/s)'
complete -c xllm -n "__fish_xllm_needs_command" -f -a "quantize" -d 'Quantize a model (safetensors or GGUF) into a GGUF file, one tensor at a time'
complete -c xllm -n "__fish_xllm_needs_command" -f -a "imatrix" -d 'Importance matrix for low-bit quantization: input activation statistics of every matmul weight on calibration text (llama.cpp\'s GGUF imatrix format, or legacy .dat)'
complete -c xllm -n "__fish_xllm_needs_command" -f -a "embed" -d 'Embedding vectors for texts (arguments, --file lines or stdin lines)'
complete -c xllm -n "__fish_xllm_needs_command" -f -a "tokenize" -d 'Print the token ids and pieces of a text (like llama-tokenize)'
complete -c xllm -n "__fish_xllm_needs_command" -f -a "completions" -d 'Print shell completions'
complete -c xllm -n "__fish_xllm_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c xllm -n "__fish_xllm_using_subcommand pull" -l revision -d 'Branch, tag or commit to download' -r
complete -c xllm -n "__fish_xllm_using_subcommand pull" -s h -l help -d 'Print help'
complete -c xllm -n "__fish_xllm_using_subcommand pull" -s V -l version -d 'Print version'
complete -c xllm -n "__fish_xllm_using_subcommand list" -l json -d 'Print a JSON array instead of a table'
complete -c xllm -n "__fish_xllm_using_subcommand list" -s h -l help -d 'Print help'
complete -c xllm -n "__fish_xllm_using_subcommand list" -s V -l version -d 'Print version'
complete -c xllm -n "__fish_xllm_using_subcommand show" -l json -d 'Print JSON instead of text'
complete -c xllm -n "__fish_xllm_using_subcommand show" -s h -l help -d 'Print help'
complete -c xllm -n "__fish_xllm_using_subcommand show" -s V -l version -d 'Print version'
complete -c xllm -n "__fish_xllm_using_subcommand rm" -s h -l help -d 'Print help'
complete -c xllm -n "__fish_xllm_using_subcommand rm" -s V -l version -d 'Print version'
complete -c xllm -n "__fish_xllm_using_subcommand run" -l system -d 'System prompt' -r
complete -c xllm -n "__fish_xllm_using_subcommand run" -l format -d 'Output format of a one-shot answer' -r -f -a "text\t''
json\t''"
complete -c xllm -n "__fish_xllm_using_subcommand run" -s n -l max-tokens -d 'Maximum tokens to generate' -r
complete -c xllm -n "__fish_xllm_using_subcommand run" -l stop -d 'Stop when this text is generated (repeatable)' -r
complete -c xllm -n "__fish_xllm_using_subcommand run" -l reasoning-effort -d 'gpt-oss: reasoning effort' -r -f -a "low\t''
medium\t''
high\t''"
complete -c xllm -n "__fish_xllm_using_subcommand run" -l json-schema -d 'Answer with JSON that validates against the JSON Schema in FILE; unsupported schema keywords are refused by name' -r -F
complete -c xllm -n "__fish_xllm_using_subcommand run" -l grammar -d 'Answer in the grammar in FILE (llguidance\'s Lark syntax: `start: ...`, `%json {..}`)' -r -F
complete -c xllm -n "__fish_xllm_using_subcommand run" -l regex -d 'Answer with text that matches this regular expression (Rust regex syntax)' -r
complete -c xllm -n "__fish_xllm_using_subcommand run" -l temperature -d 'Sampling temperature; 0 is greedy' -r
complete -c xllm -n "__fish_xllm_using_subcommand run" -l top-k -r
complete -c xllm -n "__fish_xllm_using_subcommand run" -l top-p -r
complete -c xllm -n "__fish_xllm_using_subcommand run" -l min-p -r
complete -c xllm -n "__fish_xllm_using_subcommand run" -l repeat-penalty -r
complete -c xllm -n "__fish_xllm_using_subcommand run" -l repeat-last-n -d 'Tokens considered by the repeat penalty' -r
complete -c xllm -n "__fish_xllm_using_subcommand run" -l presence-penalty -r
complete -c xllm -n "__fish_xllm_using_subcommand run" -l frequency-penalty -r
complete -c xllm -n "__fish_xllm_using_subcommand run" -l seed -d 'Random seed (same seed, same output)' -r
complete -c xllm -n "__fish_xllm_using_subcommand run" -l device -d 'Device: `cpu`, `cuda`, `cuda:N` or `metal` (default: the best available)' -r
complete -c xllm -n "__fish_xllm_using_subcommand run" -l threads -d 'CPU threads (default: all cores)' -r
complete -c xllm -n "__fish_xllm_using_subcommand run" -l ctx -d 'Context length to allocate (default: the model\'s, capped for memory)' -r
complete -c xllm -n "__fish_xllm_using_subcommand run" -l raw -d 'Feed the prompt as is, without the chat template'
complete -c xllm -n "__fish_xllm_using_subcommand run" -s v -l verbose -d 'Print timing statistics to stderr'
complete -c xllm -n "__fish_xllm_using_subcommand run" -l hide-thinking -d 'Hide the reasoning (gpt-oss\'s "analysis" channel, `<think>` text) and show only the answer'
complete -c xllm -n "__fish_xllm_using_subcommand run" -l think -d '`<think>` models (Nemotron): reason before answering (the template\'s `enable_thinking`; on by default in Nemotron\'s template)'
complete -c xllm -n "__fish_xllm_using_subcommand run" -l no-think -d '`<think>` models: answer without reasoning (`enable_thinking` false)'
complete -c xllm -n "__fish_xllm_using_subcommand run" -l json-object -d 'Answer with one JSON object (any keys). (`--format json` is this command\'s JSON envelope for the answer, not a constraint.)'
complete -c xllm -n "__fish_xllm_using_subcommand run" -s h -l help -d 'Print help'
complete -c xllm -n "__fish_xllm_using_subcommand run" -s V -l version -d 'Print version'
complete -c xllm -n "__fish_xllm_using_subcommand serve" -l host -d 'Address to listen on (`XLLM_HOST` may also give `host:port`)' -r
complete -c xllm -n "__fish_xllm_using_subcommand serve" -l port -d 'Port to listen on (0: any free port; the address is logged)' -r
complete -c xllm -n "__fish_xllm_using_subcommand serve" -l model -d 'A local model to serve: `PATH` (named after the file or folder) or `NAME=PATH` (repeatable). Store models are served by name without this' -r
complete -c xllm -n "__fish_xllm_using_subcommand serve" -l preload -d 'Load these models (names as clients use them) before reporting ready' -r
complete -c xllm -n "__fish_xllm_using_subcommand serve" -l api-key -d 'Require `Authorization: Bearer KEY` on every route but /health' -r
complete -c xllm -n "__fish_xllm_using_subcommand serve" -l keep-alive -d 'How long a model stays loaded after its last request (`5m`, `1h`, `0`, `-1` = forever)' -r
complete -c xllm -n "__fish_xllm_using_subcommand serve" -l parallel -d 'Sequences each model runs at once (continuous batching)' -r
complete -c xllm -n "__fish_xllm_using_subcommand serve" -l max-queue -d 'Requests that may wait per model before new ones are refused with 503' -r
complete -c xllm -n "__fish_xllm_using_subcommand serve" -l max-models -d 'Models loaded at once (the least recently used idle one is unloaded first)' -r
complete -c xllm -n "__fish_xllm_using_subcommand serve" -l memory-limit -d 'Memory all loaded models may use together, e.g. `8GB` (default: what is free)' -r
complete -c xllm -n "__fish_xllm_using_subcommand serve" -l cors-origin -d 'Allow browsers on these origins (CORS; `*` for any). Off by default' -r
complete -c xllm -n "__fish_xllm_using_subcommand serve" -l body-limit -d 'Largest request body, e.g. `8MB`' -r
complete -c xllm -n "__fish_xllm_using_subcommand serve" -l shutdown-timeout -d 'After SIGTERM, how long running requests may finish before they are cancelled' -r
complete -c xllm -n "__fish_xllm_using_subcommand serve" -l device -d 'Device: `cpu`, `cuda`, `cuda:N` or `metal` (default: the best available)' -r
complete -c xllm -n "__fish_xllm_using_subcommand serve" -l threads -d 'CPU threads (default: all cores)' -r
complete -c xllm -n "__fish_xllm_using_subcommand serve" -l ctx -d 'Context length to allocate (default: the model\'s, capped for memory)' -r
complete -c xllm -n "__fish_xllm_using_subcommand serve" -s h -l help -d 'Print help'
complete -c xllm -n "__fish_xllm_using_subcommand serve" -s V -l version -d 'Print version'
complete -c xllm -n "__fish_xllm_using_subcommand perplexity" -s f -l file -d 'Text file to score' -r -F
complete -c xllm -n "__fish_xllm_using_subcommand perplexity" -l device -d 'Device: `cpu`, `cuda`, `cuda:N` or `metal` (default: the best available)' -r
complete -c xllm -n "__fish_xllm_using_subcommand perplexity" -l threads -d 'CPU threads (default: all cores)' -r
complete -c xllm -n "__fish_xllm_using_subcommand perplexity" -l ctx -d 'Context length to allocate (default: the model\'s, capped for memory)' -r
complete -c xllm -n "__fish_xllm_using_subcommand perplexity" -l add-bos -d 'Prepend the BOS token'
complete -c xllm -n "__fish_xllm_using_subcommand perplexity" -l llama-cpp -d 'Score as llama.cpp\'s `llama-perplexity` does, for comparable numbers: chunks of `--ctx` tokens (default 512) of the text tokenized with BOS, each chunk starting with BOS, only the second half of each chunk scored'
complete -c xllm -n "__fish_xllm_using_subcommand perplexity" -l json -d 'Print JSON'
complete -c xllm -n "__fish_xllm_using_subcommand perplexity" -s h -l help -d 'Print help'
complete -c xllm -n "__fish_xllm_using_subcommand perplexity" -s V -l version -d 'Print version'
complete -c xllm -n "__fish_xllm_using_subcommand bench" -s p -l prompt-tokens -d 'Prompt tokens to prefill' -r
complete -c xllm -n "__fish_xllm_using_subcommand bench" -s n -l gen-tokens -d 'Tokens to decode' -r
complete -c xllm -n "__fish_xllm_using_subcommand bench" -s r -l repeats -d 'Repetitions (the median is reported)' -r
complete -c xllm -n "__fish_xllm_using_subcommand bench" -l parallel -d 'Run N sequences at once through the continuous-batching scheduler and report aggregate and per-sequence decode speed and time to first token' -r
complete -c xllm -n "__fish_xllm_using_subcommand bench" -l json-schema -d 'Answer with JSON that validates against the JSON Schema in FILE; unsupported schema keywords are refused by name' -r -F
complete -c xllm -n "__fish_xllm_using_subcommand bench" -l grammar -d 'Answer in the grammar in FILE (llguidance\'s Lark syntax: `start: ...`, `%json {..}`)' -r -F
complete -c xllm -n "__fish_xllm_using_subcommand bench" -l regex -d 'Answer with text that matches this regular expression (Rust regex syntax)' -r
complete -c xllm -n "__fish_xllm_using_subcommand bench" -l device -d 'Device: `cpu`, `cuda`, `cuda:N` or `metal` (default: the best available)' -r
complete -c xllm -n "__fish_xllm_using_subcommand bench" -l threads -d 'CPU threads (default: all cores)' -r
complete -c xllm -n "__fish_xllm_using_subcommand bench" -l ctx -d 'Context length to allocate (default: the model\'s, capped for memory)' -r
complete -c xllm -n "__fish_xllm_using_subcommand bench" -l json -d 'Print JSON'
complete -c xllm -n "__fish_xllm_using_subcommand bench" -l json-object -d 'Answer with one JSON object (any keys). (`--format json` is this command\'s JSON envelope for the answer, not a constraint.)'
complete -c xllm -n "__fish_xllm_using_subcommand bench" -s h -l help -d 'Print help'
complete -c xllm -n "__fish_xllm_using_subcommand bench" -s V -l version -d 'Print version'
complete -c xllm -n "__fish_xllm_using_subcommand quantize" -s t -l type -d 'Target type: F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, TQ1_0, TQ2_0 (Q3_K, Q4_K, Q5_K mean their _M mix)' -r
complete -c xllm -n "__fish_xllm_using_subcommand quantize" -s o -l output -d 'Output file (default: `<source>-<TYPE>.gguf` in the current folder)' -r -F
complete -c xllm -n "__fish_xllm_using_subcommand quantize" -l name -d 'Add the result to the store under this name instead of writing a file' -r
complete -c xllm -n "__fish_xllm_using_subcommand quantize" -l ternary-scale -d 'How TQ1_0/TQ2_0 blocks are scaled: absmax (llama.cpp\'s block absmax, the default) or absmean-channel (BitNet b1.58: mean |w| of each output row)' -r -f -a "absmax\t''
absmean-channel\t''"
complete -c xllm -n "__fish_xllm_using_subcommand quantize" -l threads -d 'Worker threads (default: all cores)' -r
complete -c xllm -n "__fish_xllm_using_subcommand quantize" -l imatrix -d 'Importance matrix (`xllm imatrix` or `llama-imatrix` output, GGUF or legacy .dat): weighs the rounding error of Q2_K..Q6_K and Q4_0..Q5_1 as llama-quantize does' -r -F
complete -c xllm -n "__fish_xllm_using_subcommand quantize" -l dry-run -d 'Print the plan (tensor, role, shape, types, bytes) and the output size; write nothing'
complete -c xllm -n "__fish_xllm_using_subcommand quantize" -l json -d 'With --dry-run: print the plan as JSON'
complete -c xllm -n "__fish_xllm_using_subcommand quantize" -l stats -d 'With --dry-run: quantize in memory and print each tensor\'s reconstruction error (‖w − ŵ‖ / ‖w‖; for TQ1_0/TQ2_0 under both ternary scales)'
complete -c xllm -n "__fish_xllm_using_subcommand quantize" -s h -l help -d 'Print help'
complete -c xllm -n "__fish_xllm_using_subcommand quantize" -s V -l version -d 'Print version'
complete -c xllm -n "__fish_xllm_using_subcommand imatrix" -s f -l file -d 'Calibration text (default: calibration.txt in the model\'s folder, else xllm\'s built-in text)' -r -F
complete -c xllm -n "__fish_xllm_using_subcommand imatrix" -l chunks -d 'Use at most this many chunks of the text (default: all)' -r
complete -c xllm -n "__fish_xllm_using_subcommand imatrix" -l ctx -d 'Tokens per chunk (llama-imatrix\'s -c)' -r
complete -c xllm -n "__fish_xllm_using_subcommand imatrix" -s o -l output -d 'Output file: llama.cpp\'s GGUF imatrix format, or the legacy format when it ends in .dat' -r -F
complete -c xllm -n "__fish_xllm_using_subcommand imatrix" -l threads -d 'CPU threads (default: all cores)' -r
complete -c xllm -n "__fish_xllm_using_subcommand imatrix" -l no-cache -d 'Recompute even when a cached result for this model and text exists'
complete -c xllm -n "__fish_xllm_using_subcommand imatrix" -s h -l help -d 'Print help'
complete -c xllm -n "__fish_xllm_using_subcommand imatrix" -s V -l version -d 'Print version'
complete -c xllm -n "__fish_xllm_using_subcommand embed" -s f -l file -d 'Read inputs from this file, one per non-empty line (`-` for stdin)' -r -F
complete -c xllm -n "__fish_xllm_using_subcommand embed" -l format -d 'Output format' -r -f -a "text\t'One JSON array of numbers per input, one per line'
jsonl\t'One JSON object per line: index, tokens, embedding'
json\t'One JSON document with every vector'"
complete -c xllm -n "__fish_xllm_using_subcommand embed" -l dimensions -d 'Keep the first N dimensions (Matryoshka), renormalised when the model normalises' -r
complete -c xllm -n "__fish_xllm_using_subcommand embed" -l device -d 'Device: only `cpu` runs embedding models for now' -r
complete -c xllm -n "__fish_xllm_using_subcommand embed" -l threads -d 'CPU threads (default: all cores)' -r
complete -c xllm -n "__fish_xllm_using_subcommand embed" -l json -d 'Same as --format json'
complete -c xllm -n "__fish_xllm_using_subcommand embed" -l no-truncate -d 'Refuse inputs longer than the model\'s limit instead of truncating them'
complete -c xllm -n "__fish_xllm_using_subcommand embed" -s v -l verbose -d 'Print load and embed durations, token count and rate to stderr'
complete -c xllm -n "__fish_xllm_using_subcommand embed" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c xllm -n "__fish_xllm_using_subcommand embed" -s V -l version -d 'Print version'
complete -c xllm -n "__fish_xllm_using_subcommand tokenize" -l no-bos -d 'Do not add what the model adds to a raw prompt (BOS)'
complete -c xllm -n "__fish_xllm_using_subcommand tokenize" -l json -d 'Print JSON (`ids` and `pieces`)'
complete -c xllm -n "__fish_xllm_using_subcommand tokenize" -s h -l help -d 'Print help'
complete -c xllm -n "__fish_xllm_using_subcommand tokenize" -s V -l version -d 'Print version'
complete -c xllm -n "__fish_xllm_using_subcommand completions" -s h -l help -d 'Print help'
complete -c xllm -n "__fish_xllm_using_subcommand completions" -s V -l version -d 'Print version'
complete -c xllm -n "__fish_xllm_using_subcommand help; and not __fish_seen_subcommand_from pull list show rm run serve perplexity bench quantize imatrix embed tokenize completions help" -f -a "pull" -d 'Download a model from the Hugging Face Hub into the store (resumable, verified)'
complete -c xllm -n "__fish_xllm_using_subcommand help; and not __fish_seen_subcommand_from pull list show rm run serve perplexity bench quantize imatrix embed tokenize completions help" -f -a "list" -d 'List the models in the store'
complete -c xllm -n "__fish_xllm_using_subcommand help; and not __fish_seen_subcommand_from pull list show rm run serve perplexity bench quantize imatrix embed tokenize completions help" -f -a "show" -d 'Show a model\'s architecture, parameters, quantization and files'
complete -c xllm -n "__fish_xllm_using_subcommand help; and not __fish_seen_subcommand_from pull list show rm run serve perplexity bench quantize imatrix embed tokenize completions help" -f -a "rm" -d 'Remove models from the store (partial downloads included)'
complete -c xllm -n "__fish_xllm_using_subcommand help; and not __fish_seen_subcommand_from pull list show rm run serve perplexity bench quantize imatrix embed tokenize completions help" -f -a "run" -d 'Chat with a model (REPL), or answer one prompt and exit'
complete -c xllm -n "__fish_xllm_using_subcommand help; and not __fish_seen_subcommand_from pull list show rm run serve perplexity bench quantize imatrix embed tokenize completions help" -f -a "serve" -d 'Serve models over HTTP: OpenAI- and Ollama-compatible APIs on the batching engine'
complete -c xllm -n "__fish_xllm_using_subcommand help; and not __fish_seen_subcommand_from pull list show rm run serve perplexity bench quantize imatrix embed tokenize completions help" -f -a "perplexity" -d 'Measure perplexity of a model on a text file'
complete -c xllm -n "__fish_xllm_using_subcommand help; and not __fish_seen_subcommand_from pull list show rm run serve perplexity bench quantize imatrix embed tokenize completions help" -f -a "bench" -d 'Measure prefill and decode speed (tokens/s)'
complete -c xllm -n "__fish_xllm_using_subcommand help; and not __fish_seen_subcommand_from pull list show rm run serve perplexity bench quantize imatrix embed tokenize completions help" -f -a "quantize" -d 'Quantize a model (safetensors or GGUF) into a GGUF file, one tensor at a time'
complete -c xllm -n "__fish_xllm_using_subcommand help; and not __fish_seen_subcommand_from pull list show rm run serve perplexity bench quantize imatrix embed tokenize completions help" -f -a "imatrix" -d 'Importance matrix for low-bit quantization: input activation statistics of every matmul weight on calibration text (llama.cpp\'s GGUF imatrix format, or legacy .dat)'
complete -c xllm -n "__fish_xllm_using_subcommand help; and not __fish_seen_subcommand_from pull list show rm run serve perplexity bench quantize imatrix embed tokenize completions help" -f -a "embed" -d 'Embedding vectors for texts (arguments, --file lines or stdin lines)'
complete -c xllm -n "__fish_xllm_using_subcommand help; and not __fish_seen_subcommand_from pull list show rm run serve perplexity bench quantize imatrix embed tokenize completions help" -f -a "tokenize" -d 'Print the token ids and pieces of a text (like llama-tokenize)'
complete -c xllm -n "__fish_xllm_using_subcommand help; and not __fish_seen_subcommand_from pull list show rm run serve perplexity bench quantize imatrix embed tokenize completions help" -f -a "completions" -d 'Print shell completions'
complete -c xllm -n "__fish_xllm_using_subcommand help; and not __fish_seen_subcommand_from pull list show rm run serve perplexity bench quantize imatrix embed tokenize completions help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
