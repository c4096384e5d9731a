//! `nvdra-agent` (being built).
fn main() {}
