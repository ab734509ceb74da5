//! Text conditioning: the CLIP tokenizer and text encoder.
pub mod tokenizer;
