#![no_main]

use mesh_db::Lsn;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(lsn) = text.parse::<Lsn>() {
        // What parses prints back to the same position.
        assert_eq!(lsn.to_string().parse::<Lsn>().ok(), Some(lsn), "{text:?}");
    }
});
