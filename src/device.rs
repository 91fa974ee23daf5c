//! Choosing where a model runs (`--device cpu|cuda[:N]|metal[:N]`, default: the best available)
//! and checking before loading that it fits there: weights + KV cache at the requested context +
//! activations, refused with the numbers when the device has less free memory.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// What the user asked for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// No `--device`: CUDA GPU 0 if there is one, else Metal, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
    Metal(usize),
}

/// A `--device` value that is not one of the accepted spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid device '{0}': expected cpu, cuda, cuda:N, metal or metal:N (N = GPU index, from 0)"
)]
pub struct InvalidDevice(pub String);

impl FromStr for DeviceRequest {
    type Err = InvalidDevice;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let spec = s.trim().to_ascii_lowercase();
        let (kind, index) = match spec.split_once(':') {
            Some((kind, index)) => {
                let index = index
                    .parse::<usize>()
                    .map_err(|_| InvalidDevice(s.to_string()))?;
                (kind.to_string(), Some(index))
            }
            None => (spec.clone(), None),
        };
        match (kind.as_str(), index) {
            ("cpu", None) => Ok(DeviceRequest::Cpu),
            ("auto", None) => Ok(DeviceRequest::Auto),
            ("cuda" | "gpu", index) => Ok(DeviceRequest::Cuda(index.unwrap_or(0))),
            ("metal", index) => Ok(DeviceRequest::Metal(index.unwrap_or(0))),
            _ => Err(InvalidDevice(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Auto => f.write_str("auto"),
            DeviceRequest::Cpu => f.write_str("cpu"),
            DeviceRequest::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceRequest::Metal(i) => write!(f, "metal:{i}"),
        }
    }
}

/// A GPU was asked for and cannot be used: not compiled in, or not present.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{requested} requested, but this xllm was built without {backend} support: rebuild with `cargo build --release --features {feature}` (see docs/cuda.md), or use --device cpu")]
    NotCompiled {
        requested: DeviceRequest,
        backend: &'static str,
        feature: &'static str,
    },
    #[error("no {backend} GPU found for {requested}: {reason}. Check the driver (nvidia-smi) and the GPU index, or use --device cpu")]
    NotFound {
        requested: DeviceRequest,
        backend: &'static str,
        reason: String,
    },
}

/// Opens the device for a `--device` value (`None` = best available). The function `run`,
/// `perplexity` and `bench` call.
pub fn select_device(spec: Option<&str>) -> anyhow::Result<Device> {
    let request = match spec {
        Some(s) => s.parse::<DeviceRequest>()?,
        None => DeviceRequest::Auto,
    };
    Ok(open_device(request)?)
}

/// Opens a requested device; [`DeviceRequest::Auto`] never fails (it falls back to the CPU).
pub fn open_device(request: DeviceRequest) -> Result<Device, DeviceError> {
    match request {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Auto => Ok(open_device(DeviceRequest::Cuda(0))
            .or_else(|_| open_device(DeviceRequest::Metal(0)))
            .unwrap_or(Device::Cpu)),
        DeviceRequest::Cuda(index) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(DeviceError::NotCompiled {
                    requested: request,
                    backend: "CUDA",
                    feature: "cuda",
                });
            }
            open_gpu(request, "CUDA", || Device::new_cuda(index))
        }
        DeviceRequest::Metal(index) => {
            if !candle_core::utils::metal_is_available() {
                return Err(DeviceError::NotCompiled {
                    requested: request,
                    backend: "Metal",
                    feature: "metal",
                });
            }
            open_gpu(request, "Metal", || Device::new_metal(index))
        }
    }
}

/// Runs a GPU constructor, turning its error (or a panic inside the driver bindings) into
/// [`DeviceError::NotFound`].
fn open_gpu(
    requested: DeviceRequest,
    backend: &'static str,
    open: impl FnOnce() -> candle_core::Result<Device> + std::panic::UnwindSafe,
) -> Result<Device, DeviceError> {
    match std::panic::catch_unwind(open) {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(e)) => Err(DeviceError::NotFound {
            requested,
            backend,
            reason: first_line(&e.to_string()),
        }),
        Err(_) => Err(DeviceError::NotFound {
            requested,
            backend,
            reason: "the driver could not be initialised".into(),
        }),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim().to_string()
}

/// A readable name for messages: `cpu`, `cuda:0`, `metal:0`.
pub fn device_label(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// What a model needs on its device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Weights as they will sit on the device (after any dtype conversion at load).
    pub weights: u64,
    /// KV cache for `context` tokens of one sequence.
    pub kv_cache: u64,
    /// Peak activations of one forward pass (see [`activation_bytes`]).
    pub activations: u64,
    /// Context the KV figure is for.
    pub context: usize,
    /// KV bytes per token (for the advice in the error).
    pub kv_bytes_per_token: u64,
    /// Recurrent (Mamba conv + SSM) state of one sequence: fixed, whatever its length.
    pub recurrent_state: u64,
}

impl MemoryEstimate {
    pub fn new(weights: u64, kv_bytes_per_token: u64, context: usize, activations: u64) -> Self {
        Self {
            weights,
            kv_cache: kv_bytes_per_token.saturating_mul(context as u64),
            activations,
            context,
            kv_bytes_per_token,
            recurrent_state: 0,
        }
    }

    /// Adds a sequence's recurrent state (hybrid models such as Nemotron-H).
    pub fn with_recurrent_state(mut self, bytes: u64) -> Self {
        self.recurrent_state = bytes;
        self
    }

    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.kv_cache)
            .saturating_add(self.recurrent_state)
            .saturating_add(self.activations)
    }
}

/// Shape facts the activation estimate needs.
#[derive(Debug, Clone, Copy)]
pub struct ActivationShape {
    pub hidden: usize,
    /// Widest MLP (for MoE: intermediate × active experts).
    pub intermediate: usize,
    pub vocab: usize,
    pub heads: usize,
    /// Tokens of the largest forward pass (the prefill chunk).
    pub batch_tokens: usize,
    pub context: usize,
    /// Bytes per element of the compute dtype.
    pub dtype_bytes: usize,
}

/// Peak activation bytes of one forward pass, on the generous side: residual stream and its
/// temporaries (4 × hidden), the MLP's gate/up/product (3 × intermediate), attention scores when
/// materialized (heads × tokens × context, f32) and f32 logits for every token of the pass.
pub fn activation_bytes(s: &ActivationShape) -> u64 {
    let t = s.batch_tokens as u64;
    let per_token = (4 * s.hidden + 3 * s.intermediate) as u64 * s.dtype_bytes as u64;
    let scores = s.heads as u64 * t * s.context as u64 * 4;
    let logits = s.vocab as u64 * t * 4;
    t * per_token + scores + logits
}

/// The model does not fit in the device's free memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not enough memory on {device}: the model needs about {} (weights {} + KV cache {} for {} tokens{} + activations {}) but only {} is free. \
     Try a smaller --ctx (the KV cache costs {} per token), a quantized KV cache (:kv_int8 or :kv_fp8), a smaller quantization, or another --device",
    human_bytes(estimate.total()),
    human_bytes(estimate.weights),
    human_bytes(estimate.kv_cache),
    estimate.context,
    recurrent_note(estimate),
    human_bytes(estimate.activations),
    human_bytes(*available),
    human_bytes(estimate.kv_bytes_per_token)
)]
pub struct InsufficientMemory {
    pub device: String,
    pub estimate: MemoryEstimate,
    pub available: u64,
}

fn recurrent_note(estimate: &MemoryEstimate) -> String {
    match estimate.recurrent_state {
        0 => String::new(),
        b => format!(" + recurrent state {}", human_bytes(b)),
    }
}

/// Refuses when `estimate` exceeds `available` bytes.
pub fn check_fits(
    device: &str,
    estimate: &MemoryEstimate,
    available: u64,
) -> Result<(), InsufficientMemory> {
    if estimate.total() > available {
        return Err(InsufficientMemory {
            device: device.to_string(),
            estimate: *estimate,
            available,
        });
    }
    Ok(())
}

/// Free memory of a device in bytes, when it can be asked: CUDA's free device memory, the
/// system's available memory for the CPU; `None` for Metal (unified memory, no reliable figure).
pub fn free_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => mem_available_from_proc(),
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => dev
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _total)| free as u64),
        _ => None,
    }
}

/// Checks `estimate` against the device's free memory; devices that cannot report pass.
/// The function the engine calls before loading weights.
pub fn ensure_fits(device: &Device, estimate: &MemoryEstimate) -> Result<(), InsufficientMemory> {
    match free_memory(device) {
        Some(available) => check_fits(&device_label(device), estimate, available),
        None => Ok(()),
    }
}

/// `MemAvailable` of /proc/meminfo (Linux), in bytes.
fn mem_available_from_proc() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Decimal units, like `list` and `show` print sizes ("13.8 GB").
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_accepted_spelling() {
        let cases = [
            ("cpu", DeviceRequest::Cpu),
            ("CPU", DeviceRequest::Cpu),
            ("auto", DeviceRequest::Auto),
            ("cuda", DeviceRequest::Cuda(0)),
            ("cuda:0", DeviceRequest::Cuda(0)),
            ("cuda:3", DeviceRequest::Cuda(3)),
            ("gpu:1", DeviceRequest::Cuda(1)),
            ("metal", DeviceRequest::Metal(0)),
            (" metal:1 ", DeviceRequest::Metal(1)),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<DeviceRequest>(), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_bad_spellings_naming_the_choices() {
        for bad in ["", "tpu", "cuda:", "cuda:x", "cuda:-1", "cpu:0", "cuda:0:1"] {
            let err = bad.parse::<DeviceRequest>().unwrap_err();
            let text = err.to_string();
            assert!(text.contains(&format!("'{bad}'")), "{text}");
            assert!(text.contains("cpu, cuda, cuda:N, metal"), "{text}");
        }
    }

    #[test]
    fn cpu_always_opens_and_auto_falls_back() {
        assert!(select_device(Some("cpu")).unwrap().is_cpu());
        let auto = select_device(None).unwrap();
        // Without a GPU backend compiled in, "best available" is the CPU.
        if !candle_core::utils::cuda_is_available() && !candle_core::utils::metal_is_available() {
            assert!(auto.is_cpu());
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let err = select_device(Some("cuda:1")).unwrap_err().to_string();
        assert!(err.contains("cuda:1 requested"), "{err}");
        assert!(err.contains("--features cuda"), "{err}");
        assert!(err.contains("--device cpu"), "{err}");
    }

    #[cfg(not(feature = "metal"))]
    #[test]
    fn metal_without_the_feature_says_how_to_get_it() {
        let err = select_device(Some("metal")).unwrap_err().to_string();
        assert!(err.contains("metal:0 requested"), "{err}");
        assert!(err.contains("--features metal"), "{err}");
    }

    #[test]
    fn estimate_adds_kv_for_the_whole_context() {
        let e = MemoryEstimate::new(1_000, 10, 300, 7);
        assert_eq!(e.kv_cache, 3_000);
        assert_eq!(e.total(), 4_007);
    }

    #[test]
    fn activation_estimate_counts_each_term() {
        let s = ActivationShape {
            hidden: 8,
            intermediate: 16,
            vocab: 100,
            heads: 2,
            batch_tokens: 3,
            context: 10,
            dtype_bytes: 2,
        };
        // 3 tokens × (4·8 + 3·16) × 2 bytes + 2 heads × 3 × 10 × 4 + 100 × 3 × 4
        assert_eq!(activation_bytes(&s), 3 * 80 * 2 + 240 + 1200);
    }

    #[test]
    fn refusal_names_every_number_and_the_remedies() {
        // gpt-oss-20b-like: 13.8 GB of weights, 48 KB of bf16 KV per token, 128k context.
        let e = MemoryEstimate::new(13_800_000_000, 49_152, 131_072, 300_000_000);
        let err = check_fits("cuda:0", &e, 16_000_000_000)
            .unwrap_err()
            .to_string();
        for needle in [
            "not enough memory on cuda:0",
            "about 20.5 GB",
            "weights 13.8 GB",
            "KV cache 6.4 GB for 131072 tokens",
            "activations 300.0 MB",
            "only 16.0 GB is free",
            "49.2 KB per token",
            "--ctx",
            ":kv_int8",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in: {err}");
        }
        assert!(check_fits("cuda:0", &e, e.total()).is_ok());
    }

    #[test]
    fn reads_mem_available() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   12345 kB\n";
        assert_eq!(parse_mem_available(text), Some(12345 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert!(free_memory(&Device::Cpu).is_some_and(|b| b > 0));
    }

    #[test]
    fn human_bytes_uses_decimal_units() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_500), "1.5 KB");
        assert_eq!(human_bytes(13_800_000_000), "13.8 GB");
    }
}
