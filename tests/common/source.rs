//! Where the tests read the checkout's files. Kept apart from `common` so test binaries
//! that need only this (readme, js_client) include it alone.

/// The checkout the tests read files from: cargo and nextest name it when they run a test;
/// the path compiled in is the fallback. A test binary built in a shared target dir from
/// another clone of the same sources is not rebuilt, and would read that clone's files.
pub fn source_root() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map(Into::into).unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}
