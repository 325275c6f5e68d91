//! Fuzzes the line protocol's parsing: request lines with the argument cursor (as every verb
//! uses it), server lines as clients read them, the model types' field parsers, and the
//! line framer over a byte stream. Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run line_codec`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_common::lines::LineReader;
use mesh_common::model::{Budget, Endpoint, Node, Plan};
use mesh_common::proto::{Request, ServerLine};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(req)) = Request::parse(data) {
        let mut a = req.args();
        let _ = a.positional("x");
        let _ = a.optional_positional();
        let _ = a.get("app");
        let _ = a.number("min", 0u32..=10_000);
        let _ = a.number("ttl_ms", 100u64..=3_600_000);
        let _ = a.require("digest");
        let _ = a.finish();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ServerLine::parse(text);
        let _ = Plan::from_fields(text);
        let _ = Budget::from_fields(text);
        let _ = Endpoint::from_fields(text);
        let _ = Node::from_fields(text);
    }
    // The framer must never buffer past its limit or lose sync.
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(async {
        let mut r = LineReader::new(data, 64);
        while let Ok(Some(_)) = r.next_line().await {}
    });
});
