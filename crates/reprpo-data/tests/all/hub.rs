//! Hub datasets through `hf-hub`'s cache layout, offline: files are found in a cache folder built
//! here exactly as `hf-hub` writes it; a split that is not cached gives an error that says so.
//! Tests never touch the network: the online path talks to a loopback server in the test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, Int32Array, RecordBatch, StringArray};
use hf_hub::Cache;
use reprpo_data::hub::{HubOptions, PARQUET_REVISION, dataset_files_with};
use reprpo_data::recipe::HubSource;
use reprpo_data::{ConvertOptions, Converter, convert, read_table};

fn write_parquet(path: &Path, prompts: &[&str]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let n = prompts.len();
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("prompt", Arc::new(StringArray::from(prompts.to_vec()))),
        (
            "chosen_response",
            Arc::new(StringArray::from(vec![" good"; n])),
        ),
        (
            "rejected_response",
            Arc::new(StringArray::from(vec![" bad"; n])),
        ),
        (
            "n",
            Arc::new(Int32Array::from((0..n as i32).collect::<Vec<_>>())),
        ),
    ];
    let batch = RecordBatch::try_from_iter(cols).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// A cache folder as hf-hub lays it out: `datasets--org--name/refs/<revision>` holds the commit,
/// `snapshots/<commit>/<file>` the files.
fn fake_cache(root: &Path) -> Cache {
    let hub = root.join("hub");
    let repo = hub.join("datasets--org--prefs");
    let refs = repo.join("refs").join(PARQUET_REVISION);
    std::fs::create_dir_all(refs.parent().unwrap()).unwrap();
    std::fs::write(&refs, "0123abcd").unwrap();
    let snap = repo.join("snapshots/0123abcd");
    write_parquet(&snap.join("default/train/0000.parquet"), &["p1", "p2"]);
    write_parquet(&snap.join("default/train/0001.parquet"), &["p3"]);
    write_parquet(&snap.join("default/test/0000.parquet"), &["t1"]);
    Cache::new(hub)
}

fn offline(cache: &Cache) -> HubOptions {
    HubOptions {
        cache: cache.clone(),
        offline: true,
        endpoint: None,
    }
}

#[test]
fn offline_finds_cached_split_files_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let cache = fake_cache(dir.path());
    let src = HubSource {
        repo: "org/prefs".into(),
        config: "default".into(),
        split: "train".into(),
    };
    let files = dataset_files_with(&src, &offline(&cache)).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(dir.path())
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect();
    assert_eq!(
        names,
        vec![
            "hub/datasets--org--prefs/snapshots/0123abcd/default/train/0000.parquet",
            "hub/datasets--org--prefs/snapshots/0123abcd/default/train/0001.parquet",
        ]
    );
    // And they convert: the hub's Parquet goes through the same converters.
    let mut prompts = Vec::new();
    for f in &files {
        let t = read_table(f).unwrap();
        let c = convert(
            Converter::HelpSteer2Dpo,
            &t,
            &ConvertOptions {
                dataset: "prefs".into(),
                seed: 0,
            },
        )
        .unwrap();
        prompts.extend(c.pairs.into_iter().map(|p| p.prompt));
    }
    assert_eq!(prompts, vec!["p1", "p2", "p3"]);
}

#[test]
fn offline_missing_split_or_repo_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cache = fake_cache(dir.path());
    let missing_split = HubSource {
        repo: "org/prefs".into(),
        config: "default".into(),
        split: "validation".into(),
    };
    let err = dataset_files_with(&missing_split, &offline(&cache))
        .unwrap_err()
        .to_string();
    assert!(err.contains("org/prefs"), "{err}");
    assert!(err.contains("validation"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    let missing_repo = HubSource {
        repo: "org/absent".into(),
        config: "default".into(),
        split: "train".into(),
    };
    let err = dataset_files_with(&missing_repo, &offline(&cache))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not cached"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}

/// A minimal hub on loopback: the repo-info API and `resolve` with HTTP range requests, which is
/// all `hf-hub` asks of it. Serves requests until the test ends.
fn serve(
    files: Vec<(String, Vec<u8>)>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let downloads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = downloads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut range = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = v.trim().split_once('-').unwrap();
                    range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().ok()));
                }
            }
            let rev = "refs%2Fconvert%2Fparquet";
            let (status, headers, body): (&str, String, Vec<u8>) = if path
                == format!("/api/datasets/org/prefs/revision/{rev}")
            {
                let siblings: Vec<String> = files
                    .iter()
                    .map(|(f, _)| format!("{{\"rfilename\":\"{f}\"}}"))
                    .collect();
                let body = format!(
                    "{{\"siblings\":[{}],\"sha\":\"c0ffee\"}}",
                    siblings.join(",")
                );
                (
                    "200 OK",
                    "Content-Type: application/json\r\n".into(),
                    body.into_bytes(),
                )
            } else if let Some((_, data)) = files
                .iter()
                .find(|(f, _)| path == format!("/datasets/org/prefs/resolve/{rev}/{f}"))
            {
                let (a, b) = range.unwrap_or((0, None));
                let b = b.unwrap_or(data.len() - 1).min(data.len() - 1);
                if !(a == 0 && b == 0) {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let headers = format!(
                    "x-repo-commit: c0ffee\r\netag: \"{:x}\"\r\ncontent-range: bytes {a}-{b}/{}\r\n",
                    data.len() * 31 + path.len(),
                    data.len()
                );
                ("206 Partial Content", headers, data[a..=b].to_vec())
            } else {
                ("404 Not Found", String::new(), b"not found".to_vec())
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(&body);
        }
    });
    (addr, downloads)
}

/// Online: `hf-hub` lists the conversion, downloads the split's shards into the cache (once), and
/// the same files are then found offline. The hub is a loopback server; nothing leaves the machine.
#[test]
fn online_downloads_into_the_cache_then_works_offline() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("shard.parquet");
    write_parquet(&shard, &["h1", "h2"]);
    let bytes = std::fs::read(&shard).unwrap();
    let (endpoint, downloads) = serve(vec![
        ("default/train/0000.parquet".into(), bytes.clone()),
        ("default/test/0000.parquet".into(), b"not this one".to_vec()),
    ]);
    let cache = Cache::new(dir.path().join("hub"));
    let src = HubSource {
        repo: "org/prefs".into(),
        config: "default".into(),
        split: "train".into(),
    };
    let online = HubOptions {
        cache: cache.clone(),
        offline: false,
        endpoint: Some(endpoint),
    };
    let files = dataset_files_with(&src, &online).unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(std::fs::read(&files[0]).unwrap(), bytes);
    assert!(files[0].starts_with(dir.path().join("hub/datasets--org--prefs/snapshots/c0ffee")));
    assert_eq!(downloads.load(std::sync::atomic::Ordering::SeqCst), 1);
    // A second call uses the cache: no new download.
    let again = dataset_files_with(&src, &online).unwrap();
    assert_eq!(again, files);
    assert_eq!(downloads.load(std::sync::atomic::Ordering::SeqCst), 1);
    // And offline mode finds the same file.
    assert_eq!(dataset_files_with(&src, &offline(&cache)).unwrap(), files);
    let t = read_table(&files[0]).unwrap();
    assert_eq!(t.len(), 2);
}
