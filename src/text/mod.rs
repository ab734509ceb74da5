//! Text conditioning: the CLIP tokenizer and text encoder.
pub mod clip_text_model;
pub mod context;
pub mod tokenizer;
