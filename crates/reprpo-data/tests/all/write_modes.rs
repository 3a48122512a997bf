//! Prepared data files get the permissions every other file gets (0666 masked by the umask), not
//! the temporary file's private 0600 (issue 15, point 16).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[cfg(unix)]
#[test]
fn prepared_files_follow_the_umask() {
    use reprpo_data::{PreferencePair, write};
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.txt");
    std::fs::File::create(&plain).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let want = mode(&plain);
    let pair = PreferencePair {
        id: "t/1".into(),
        prompt: "p".into(),
        chosen: "c".into(),
        rejected: "r".into(),
        source: Default::default(),
    };
    for name in ["pairs.jsonl", "pairs.parquet"] {
        let out = dir.path().join(name);
        write::write_pairs(&out, std::slice::from_ref(&pair)).unwrap();
        assert_eq!(
            mode(&out),
            want,
            "{name}: mode {:o}, plain file {want:o}",
            mode(&out)
        );
    }
}
