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
    // Fault injection for the watchdog's tests (`SCANGATE_FAULT_WEDGE`, see
    // `service::progress`): in dev and test builds only, never in a release or bench build.
    println!("cargo::rustc-check-cfg=cfg(scangate_fault_injection)");
    if std::env::var("PROFILE").as_deref() == Ok("debug") {
        println!("cargo:rustc-cfg=scangate_fault_injection");
    }
}
