//! Hugging Face Hub client and our resumable, verified downloader.
