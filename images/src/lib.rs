//! milk-images
