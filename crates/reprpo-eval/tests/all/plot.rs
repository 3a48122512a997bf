#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! PNG charts: they decode, have the documented size, draw their series in the palette
//! colours, render text from the embedded font, survive NaN, and write atomically.

use std::path::Path;

use reprpo_eval::plot::{
    BarSeries, HEIGHT, PALETTE, PlotError, Series, TITLE_BAND, WIDTH, bar_chart, line_chart,
};

/// Decoded RGB(A) image.
struct Image {
    width: u32,
    height: u32,
    channels: usize,
    data: Vec<u8>,
}

impl Image {
    fn rgb(&self, x: u32, y: u32) -> (u8, u8, u8) {
        let i = (y as usize * self.width as usize + x as usize) * self.channels;
        (self.data[i], self.data[i + 1], self.data[i + 2])
    }

    /// Pixels in rows `y0..y1` (all columns) that match `pred`.
    fn count_rows(&self, y0: u32, y1: u32, pred: impl Fn((u8, u8, u8)) -> bool) -> usize {
        (y0..y1)
            .flat_map(|y| (0..self.width).map(move |x| (x, y)))
            .filter(|&(x, y)| pred(self.rgb(x, y)))
            .count()
    }

    fn rows(&self, y0: u32, y1: u32) -> &[u8] {
        let row = self.width as usize * self.channels;
        &self.data[y0 as usize * row..y1 as usize * row]
    }
}

fn decode(path: &Path) -> Image {
    let file = std::fs::File::open(path).unwrap();
    let mut reader = png::Decoder::new(file).read_info().unwrap();
    let mut data = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut data).unwrap();
    data.truncate(info.buffer_size());
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected colour type {other:?}"),
    };
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    Image {
        width: info.width,
        height: info.height,
        channels,
        data,
    }
}

fn not_white(p: (u8, u8, u8)) -> bool {
    p != (255, 255, 255)
}

fn no_temp_files(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}

fn curves() -> Vec<Series> {
    vec![
        Series {
            name: "loss".into(),
            points: (0..200)
                .map(|i| (i as f64, 2.0 * (-(i as f64) / 60.0).exp()))
                .collect(),
        },
        Series {
            name: "eval_loss".into(),
            points: (0..10)
                .map(|i| (i as f64 * 20.0, 2.2 * (-(i as f64) * 20.0 / 70.0).exp()))
                .collect(),
        },
    ]
}

#[test]
fn line_chart_renders_series_in_palette_colours() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loss.png");
    line_chart(&path, "training loss", "step", &curves()).unwrap();
    let img = decode(&path);
    assert_eq!((img.width, img.height), (WIDTH, HEIGHT));
    // Plenty of ink below the title (axes, grid, lines, labels).
    assert!(img.count_rows(TITLE_BAND, HEIGHT, not_white) > 5_000);
    // Both series appear in their palette colours.
    for colour in &PALETTE[..2] {
        let hits = img.count_rows(0, HEIGHT, |p| p == *colour);
        assert!(hits > 100, "colour {colour:?} drawn on only {hits} pixels");
    }
    // A third palette colour was not used.
    assert_eq!(img.count_rows(0, HEIGHT, |p| p == PALETTE[2]), 0);
    no_temp_files(dir.path());
}

#[test]
fn title_text_is_rendered() {
    let dir = tempfile::tempdir().unwrap();
    let titled = dir.path().join("titled.png");
    let untitled = dir.path().join("untitled.png");
    line_chart(&titled, "Training loss", "step", &curves()).unwrap();
    line_chart(&untitled, "", "step", &curves()).unwrap();
    let (a, b) = (decode(&titled), decode(&untitled));
    // The empty title leaves the band blank; the real one puts dark glyph pixels there.
    assert_eq!(b.count_rows(0, TITLE_BAND, not_white), 0);
    let dark = a.count_rows(0, TITLE_BAND, |(r, g, b)| r < 100 && g < 100 && b < 100);
    assert!(dark > 200, "title band has only {dark} dark pixels");
    // The layout does not depend on the title: everything below the band is identical.
    assert!(a.rows(TITLE_BAND, HEIGHT) == b.rows(TITLE_BAND, HEIGHT));
}

#[test]
fn axis_labels_are_rendered() {
    let dir = tempfile::tempdir().unwrap();
    let a_path = dir.path().join("a.png");
    let b_path = dir.path().join("b.png");
    line_chart(&a_path, "t", "optimizer step", &curves()).unwrap();
    line_chart(&b_path, "t", "", &curves()).unwrap();
    let (a, b) = (decode(&a_path), decode(&b_path));
    // The x label sits in the bottom strip; it is the only difference between the two.
    let bottom = HEIGHT - 40;
    assert!(a.rows(bottom, HEIGHT) != b.rows(bottom, HEIGHT));
    // Tick labels: dark pixels in the left margin, left of the y axis.
    let left_dark = (TITLE_BAND..HEIGHT)
        .flat_map(|y| (0..70).map(move |x| (x, y)))
        .filter(|&(x, y)| {
            let (r, g, bl) = a.rgb(x, y);
            r < 100 && g < 100 && bl < 100
        })
        .count();
    assert!(
        left_dark > 100,
        "only {left_dark} dark pixels among the y tick labels"
    );
}

#[test]
fn nan_and_inf_points_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nan.png");
    let series = vec![Series {
        name: "loss".into(),
        points: vec![
            (0.0, 1.0),
            (1.0, f64::NAN),
            (f64::INFINITY, 0.5),
            (2.0, 0.8),
            (3.0, f64::NEG_INFINITY),
            (4.0, 0.6),
        ],
    }];
    line_chart(&path, "with NaN", "step", &series).unwrap();
    let img = decode(&path);
    assert!(img.count_rows(0, HEIGHT, |p| p == PALETTE[0]) > 100);
}

#[test]
fn single_point_and_constant_series_render() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.png");
    let series = vec![
        Series {
            name: "one".into(),
            points: vec![(5.0, 0.25)],
        },
        Series {
            name: "flat".into(),
            points: vec![(5.0, 0.25), (5.0, 0.25)],
        },
    ];
    line_chart(&path, "one point", "step", &series).unwrap();
    let img = decode(&path);
    assert!(img.count_rows(0, HEIGHT, |p| p == PALETTE[0]) > 10);
}

#[test]
fn empty_input_gives_a_no_data_chart() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, Vec<Series>); 3] = [
        ("none.png", vec![]),
        (
            "empty.png",
            vec![Series {
                name: "loss".into(),
                points: vec![],
            }],
        ),
        (
            "all_nan.png",
            vec![Series {
                name: "loss".into(),
                points: vec![(0.0, f64::NAN), (f64::NAN, 1.0)],
            }],
        ),
    ];
    for (file, series) in cases {
        let path = dir.path().join(file);
        line_chart(&path, "nothing", "step", &series).unwrap();
        let img = decode(&path);
        assert_eq!((img.width, img.height), (WIDTH, HEIGHT));
        // The "no data" text is there, and no series colour.
        assert!(img.count_rows(TITLE_BAND, HEIGHT, not_white) > 50, "{file}");
        assert_eq!(img.count_rows(0, HEIGHT, |p| p == PALETTE[0]), 0, "{file}");
    }
    let path = dir.path().join("bars_none.png");
    bar_chart(&path, "nothing", "accuracy", &[], &[]).unwrap();
    assert!(decode(&path).count_rows(TITLE_BAND, HEIGHT, not_white) > 50);
}

fn scores() -> (Vec<String>, Vec<BarSeries>) {
    let groups = vec![
        "truthful_qa".to_string(),
        "arc_easy".to_string(),
        "a_dataset_with_a_rather_long_name_indeed".to_string(),
    ];
    let bars = vec![
        BarSeries {
            name: "base".into(),
            values: vec![0.41, 0.78, 0.55],
        },
        BarSeries {
            name: "reprpo-hra".into(),
            values: vec![0.47, 0.80, f64::NAN],
        },
        BarSeries {
            name: "dpo".into(),
            values: vec![0.44, 0.79, 0.50],
        },
    ];
    (groups, bars)
}

#[test]
fn bar_chart_renders_grouped_bars() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scores.png");
    let (groups, bars) = scores();
    bar_chart(&path, "accuracy by dataset", "accuracy", &groups, &bars).unwrap();
    let img = decode(&path);
    assert_eq!((img.width, img.height), (WIDTH, HEIGHT));
    for colour in &PALETTE[..3] {
        let hits = img.count_rows(TITLE_BAND, HEIGHT, |p| p == *colour);
        assert!(hits > 2_000, "bars in {colour:?} cover only {hits} pixels");
    }
    assert_eq!(img.count_rows(0, HEIGHT, |p| p == PALETTE[3]), 0);
    no_temp_files(dir.path());

    // The title is drawn from the font.
    let untitled = dir.path().join("untitled.png");
    bar_chart(&untitled, "", "accuracy", &groups, &bars).unwrap();
    let b = decode(&untitled);
    assert!(img.rows(0, TITLE_BAND) != b.rows(0, TITLE_BAND));
    assert!(img.rows(TITLE_BAND, HEIGHT) == b.rows(TITLE_BAND, HEIGHT));
}

#[test]
fn bar_chart_handles_negative_and_large_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("margins.png");
    let groups = vec!["a".to_string(), "b".to_string()];
    let bars = vec![
        BarSeries {
            name: "x".into(),
            values: vec![-3.5, 120.0],
        },
        BarSeries {
            name: "y".into(),
            values: vec![f64::INFINITY, -0.25],
        },
    ];
    bar_chart(&path, "margins", "reward margin", &groups, &bars).unwrap();
    let img = decode(&path);
    assert!(img.count_rows(0, HEIGHT, |p| p == PALETTE[0]) > 1_000);
    assert!(img.count_rows(0, HEIGHT, |p| p == PALETTE[1]) > 0);
}

#[test]
fn bar_chart_rejects_mismatched_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.png");
    let groups = vec!["a".to_string(), "b".to_string()];
    let bars = vec![BarSeries {
        name: "short".into(),
        values: vec![0.5],
    }];
    let err = bar_chart(&path, "bad", "acc", &groups, &bars).unwrap_err();
    assert!(matches!(err, PlotError::Input { .. }), "{err}");
    assert!(err.to_string().contains("short"), "{err}");
    assert!(!path.exists());
    no_temp_files(dir.path());
}

#[test]
fn missing_directory_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no_such_dir");
    let path = missing.join("loss.png");
    let err = line_chart(&path, "loss", "step", &curves()).unwrap_err();
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    assert!(!missing.exists());
    no_temp_files(dir.path());

    let (groups, bars) = scores();
    let err = bar_chart(&path, "acc", "acc", &groups, &bars).unwrap_err();
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    assert!(!missing.exists());
}

#[test]
fn overwrites_an_existing_chart_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loss.png");
    std::fs::write(&path, b"old").unwrap();
    line_chart(&path, "loss", "step", &curves()).unwrap();
    assert_eq!(decode(&path).width, WIDTH);
    no_temp_files(dir.path());
}
