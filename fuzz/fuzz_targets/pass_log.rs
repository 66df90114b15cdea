//! The suppression stage's recovery on arbitrary pass-log rows (a damaged spool): the rows
//! that decode are restored or emitted, the others skipped, never a panic; what is restored
//! stays within `max_tracked`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

const CONFIG: &str = "[gateway]\nid = \"gw\"\nstate_dir = \"/tmp/x\"\n[suppress]\nmax_tracked = 16\n\
[[source]]\nname = \"a\"\nkind = \"serial\"\nprotocol = \"uhf-bb\"\npath = \"/dev/ttyFAKE0\"\ngroup = \"belt\"\nlocation = \"A\"\n\
[[source]]\nname = \"b\"\nkind = \"serial\"\nprotocol = \"lines\"\npath = \"/dev/ttyFAKE1\"\ngroup = \"belt\"\nlocation = \"B\"\n\
[upstream]\nurl = \"http://127.0.0.1:9\"\nprofile = \"bag-events\"\n";

fuzz_target!(|data: &[u8]| {
    let Ok(cfg) = scangate::config::Config::parse(CONFIG, std::path::Path::new("/")) else {
        return;
    };
    let mut stage = scangate::suppress::stage::Stage::new(
        &cfg,
        Arc::new(scangate::clock::SystemClock),
        Arc::default(),
        true,
    );
    // Raw bytes as one row, and as the postcard payload of a compressed row.
    let packed = zstd::bulk::compress(data, 1).unwrap_or_default();
    let rows: Vec<Vec<u8>> = data
        .split(|b| *b == 0xFF)
        .map(<[u8]>::to_vec)
        .chain(std::iter::once(packed))
        .collect();
    let mut out = Vec::new();
    stage.recover(&rows, &Default::default(), &mut out);
    assert!(stage.tracked() <= 16);
    let _ = stage.log_row(false);
});
