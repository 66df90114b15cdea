//! Records when the binary was built: a wall clock earlier than that is certainly wrong (a box
//! without a real-time clock that booted in 1970), see `src/clock.rs`. Reproducible builds set
//! `SOURCE_DATE_EPOCH`, which is used instead of the current time.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    println!("cargo:rustc-env=SCANGATE_BUILD_UNIX={secs}");
}
