//! PNG charts: line charts for training curves and grouped bar charts for evaluation scores.
//!
//! Both charts are [`WIDTH`] x [`HEIGHT`] pixels on a white background, with the title in a
//! band across the top, the plot on the left and the legend in a column on the right, so a
//! legend never hides data. Series and bars take their colours from [`PALETTE`] in order
//! (cycling past its end).
//!
//! Text is rendered from DejaVu Sans embedded in the binary (from the `dejavu` crate; the
//! fonts are under the free Bitstream Vera / DejaVu licence) by plotters' pure-Rust `ab_glyph`
//! rasteriser, so drawing needs no system fonts, fontconfig or freetype. The font is
//! registered with plotters once per process, on first use.
//!
//! Non-finite values (NaN, ±inf) are skipped. A chart with nothing finite to draw is still
//! written: it shows the title and the words "no data", so a run's plot folder always has
//! the expected files.
//!
//! [`heatmap`] draws grids of values (the hidden-state analysis' pictures) with the same frame.
//!
//! Writes are atomic: a chart is drawn to a temporary `.png` file in the target directory and
//! renamed over the target, and on any failure the temporary file is removed, so the target
//! is either the complete new chart or untouched.

pub mod heatmap;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

/// Width of every chart in pixels.
pub const WIDTH: u32 = 1024;
/// Height of every chart in pixels.
pub const HEIGHT: u32 = 640;
/// Height of the title band at the top of every chart, in pixels.
pub const TITLE_BAND: u32 = 48;

/// Series / bar colours, in order (the "tab10" palette).
pub const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// The font family name every text style here uses.
const FONT: &str = "sans-serif";
const TITLE_SIZE: f64 = 26.0;
const LABEL_SIZE: f64 = 15.0;
const LEGEND_SIZE: f64 = 15.0;
const LEGEND_ROW: i32 = 24;
/// Series with at most this many finite points also get a dot at each point.
const MARKER_MAX_POINTS: usize = 60;

/// One named line on a [`line_chart`].
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// `(x, y)` points; drawn in order of `x`, non-finite points skipped.
    pub points: Vec<(f64, f64)>,
}

/// One model/adapter on a [`bar_chart`]: its value in each group.
#[derive(Debug, Clone, PartialEq)]
pub struct BarSeries {
    /// Legend label.
    pub name: String,
    /// One value per group, in the order of the chart's groups; a non-finite value draws no bar.
    pub values: Vec<f64>,
}

/// Why a chart could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlotError {
    /// The embedded font could not be registered with plotters.
    #[error("plot {path}: embedded font unusable: {message}")]
    Font {
        /// The chart being written.
        path: PathBuf,
        /// What the font loader said.
        message: String,
    },
    /// The input cannot be drawn (e.g. a bar series with the wrong number of values).
    #[error("plot {path}: invalid input: {message}")]
    Input {
        /// The chart being written.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Drawing or encoding the PNG failed (e.g. the directory does not exist).
    #[error("plot {path}: cannot render: {message}")]
    Render {
        /// The chart being written.
        path: PathBuf,
        /// What plotters reported.
        message: String,
    },
    /// Moving the finished temporary file into place failed.
    #[error("plot {path}: cannot move {tmp} into place: {source}")]
    Io {
        /// The chart being written.
        path: PathBuf,
        /// The temporary file that was rendered.
        tmp: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Draw `series` as lines on one chart with a legend, the x axis labelled `x_label`, and
/// write it as a PNG to `path`.
///
/// Points are sorted by x; NaN/inf points are skipped; a series left with a single point is
/// drawn as a dot. If no series has a finite point (including when `series` is empty), the
/// chart shows "no data" instead of axes.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[Series],
) -> Result<(), PlotError> {
    let cleaned: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| {
            let mut pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (s.name.as_str(), pts)
        })
        .collect();
    let all = cleaned.iter().flat_map(|(_, p)| p.iter());
    let input_err = |message| PlotError::Input {
        path: path.to_path_buf(),
        message,
    };
    let x_range = padded_range(all.clone().map(|p| p.0), 0.0).map_err(input_err)?;
    let y_range = padded_range(all.map(|p| p.1), 0.05).map_err(input_err)?;
    let ranges = x_range.zip(y_range);
    write_atomic(path, |root| {
        let body = title_band(root, title)?;
        let Some((xr, yr)) = ranges else {
            return no_data(&body);
        };
        let names: Vec<&str> = cleaned.iter().map(|(n, _)| *n).collect();
        let (plot, legend_area) = split_legend(&body, &names)?;
        let mut chart = ChartBuilder::on(&plot)
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(xr, yr)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .max_light_lines(4)
            .label_style((FONT, LABEL_SIZE))
            .axis_desc_style((FONT, LABEL_SIZE))
            .bold_line_style(RGBColor(215, 215, 215))
            .light_line_style(RGBColor(240, 240, 240))
            .draw()
            .map_err(err)?;
        for (i, (_, pts)) in cleaned.iter().enumerate() {
            let colour = colour(i);
            if pts.len() > 1 {
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2)))
                    .map_err(err)?;
            }
            if !pts.is_empty() && pts.len() <= MARKER_MAX_POINTS {
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                    .map_err(err)?;
            }
        }
        draw_legend(&legend_area, &names, false)
    })
}

/// Draw grouped bars and write them as a PNG to `path`: one group per entry of `groups`
/// (e.g. a dataset), one bar per [`BarSeries`] in each group (e.g. a model or adapter),
/// with a legend and the y axis labelled `y_label`.
///
/// Every `bars[i].values` must have exactly `groups.len()` entries, otherwise
/// [`PlotError::Input`] (nothing is written). Bars start at 0, so negative values hang
/// down; the y range always includes 0 and is `[0, 1]`-like for scores. A non-finite value
/// draws no bar. If there are no groups, no bars, or no finite value, the chart shows
/// "no data".
pub fn bar_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    bars: &[BarSeries],
) -> Result<(), PlotError> {
    if let Some(bad) = bars.iter().find(|b| b.values.len() != groups.len()) {
        return Err(PlotError::Input {
            path: path.to_path_buf(),
            message: format!(
                "bar series {:?} has {} values for {} groups",
                bad.name,
                bad.values.len(),
                groups.len()
            ),
        });
    }
    let y_range =
        bar_range(bars.iter().flat_map(|b| b.values.iter().copied())).map_err(|message| {
            PlotError::Input {
                path: path.to_path_buf(),
                message,
            }
        })?;
    write_atomic(path, |root| {
        let body = title_band(root, title)?;
        let Some(yr) = y_range else {
            return no_data(&body);
        };
        let names: Vec<&str> = bars.iter().map(|b| b.name.as_str()).collect();
        let (plot, legend_area) = split_legend(&body, &names)?;
        let n_groups = groups.len();
        let mut chart = ChartBuilder::on(&plot)
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(0.0..n_groups as f64, yr.clone())
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(y_label)
            .max_light_lines(1)
            .label_style((FONT, LABEL_SIZE))
            .axis_desc_style((FONT, LABEL_SIZE))
            .bold_line_style(RGBColor(215, 215, 215))
            .light_line_style(RGBColor(240, 240, 240))
            .draw()
            .map_err(err)?;
        if yr.start < 0.0 {
            chart
                .draw_series(LineSeries::new(
                    [(0.0, 0.0), (n_groups as f64, 0.0)],
                    BLACK.stroke_width(1),
                ))
                .map_err(err)?;
        }
        // Each group spans [g, g + 1): bars fill the middle 80 %.
        let n_bars = bars.len().max(1) as f64;
        let bar_w = 0.8 / n_bars;
        let value_style = TextStyle::from((FONT, 12.0).into_font()).color(&BLACK);
        for (i, b) in bars.iter().enumerate() {
            let colour = colour(i);
            for (g, &v) in b.values.iter().enumerate() {
                if !v.is_finite() {
                    continue;
                }
                let x0 = g as f64 + 0.1 + i as f64 * bar_w;
                let x1 = x0 + bar_w;
                chart
                    .draw_series([Rectangle::new([(x0, 0.0), (x1, v)], colour.filled())])
                    .map_err(err)?;
                // The value above (or below) the bar, if it fits across the bar.
                let label = format_value(v);
                let px0 = chart.backend_coord(&(x0, v)).0;
                let (px1, py) = chart.backend_coord(&(x1, v));
                let fits = text_width(&label, 12.0).is_some_and(|w| w + 4 <= px1 - px0);
                if fits {
                    let (dy, vpos) = if v >= 0.0 {
                        (-3, VPos::Bottom)
                    } else {
                        (3, VPos::Top)
                    };
                    root.draw(&Text::new(
                        label,
                        ((px0 + px1) / 2, py + dy),
                        value_style.pos(Pos::new(HPos::Center, vpos)),
                    ))
                    .map_err(err)?;
                }
            }
        }
        // Group names under the axis, centred on each group, shortened to fit.
        let group_style = TextStyle::from((FONT, LABEL_SIZE).into_font())
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top));
        for (g, name) in groups.iter().enumerate() {
            let (left, y) = chart.backend_coord(&(g as f64, yr.start));
            let (right, _) = chart.backend_coord(&(g as f64 + 1.0, yr.start));
            let label = fit_text(name, LABEL_SIZE, right - left - 6);
            root.draw(&Text::new(
                label,
                ((left + right) / 2, y + 8),
                group_style.clone(),
            ))
            .map_err(err)?;
        }
        draw_legend(&legend_area, &names, true)
    })
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Render with `draw` into a temporary PNG next to `path`, then rename it over `path`.
fn write_atomic(
    path: &Path,
    draw: impl FnOnce(&Area<'_>) -> Result<(), String>,
) -> Result<(), PlotError> {
    ensure_font().map_err(|message| PlotError::Font {
        path: path.to_path_buf(),
        message,
    })?;
    let tmp = temp_path(path).ok_or_else(|| PlotError::Input {
        path: path.to_path_buf(),
        message: "the path has no file name".to_string(),
    })?;
    let rendered = render(&tmp, draw);
    // The backend is dropped by now, so nothing writes to `tmp` after this point.
    if let Err(message) = rendered {
        let _ = std::fs::remove_file(&tmp);
        return Err(PlotError::Render {
            path: path.to_path_buf(),
            message,
        });
    }
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        PlotError::Io {
            path: path.to_path_buf(),
            tmp: tmp.clone(),
            source,
        }
    })
}

fn render(tmp: &Path, draw: impl FnOnce(&Area<'_>) -> Result<(), String>) -> Result<(), String> {
    let root = BitMapBackend::new(tmp, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    draw(&root)?;
    root.present().map_err(err)
}

/// `<dir>/.<name>.<pid>-<n>.tmp.png`: hidden, unique per call, and ending in `.png` because
/// the encoder picks the format from the extension.
fn temp_path(path: &Path) -> Option<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name()?.to_string_lossy();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp_name = format!(".{name}.{}-{n}.tmp.png", std::process::id());
    Some(match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(tmp_name),
        _ => PathBuf::from(tmp_name),
    })
}

/// Register the embedded DejaVu Sans with plotters (once per process) under every generic
/// family name, so any default style finds it.
fn ensure_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes: &'static [u8] = dejavu::sans::regular();
            for family in [FONT, "serif", "monospace"] {
                register_font(family, FontStyle::Normal, bytes)
                    .map_err(|_| "DejaVu Sans could not be parsed".to_string())?;
            }
            Ok(())
        })
        .clone()
}

/// Draw the title centred in the top band; returns the area below it.
fn title_band<'a>(root: &Area<'a>, title: &str) -> Result<Area<'a>, String> {
    let (band, body) = root.split_vertically(TITLE_BAND);
    let style = TextStyle::from((FONT, TITLE_SIZE).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Center));
    band.draw(&Text::new(
        title.to_string(),
        ((WIDTH / 2) as i32, (TITLE_BAND / 2) as i32),
        style,
    ))
    .map_err(err)?;
    Ok(body)
}

fn no_data(body: &Area<'_>) -> Result<(), String> {
    let (w, h) = body.dim_in_pixel();
    let style = TextStyle::from((FONT, 22.0).into_font())
        .color(&RGBColor(110, 110, 110))
        .pos(Pos::new(HPos::Center, VPos::Center));
    body.draw(&Text::new(
        "no data",
        ((w / 2) as i32, (h / 2) as i32),
        style,
    ))
    .map_err(err)
}

/// Split `body` into the plot (left) and a legend column (right) wide enough for `names`
/// (within a third of the chart).
fn split_legend<'a>(body: &Area<'a>, names: &[&str]) -> Result<(Area<'a>, Area<'a>), String> {
    let widest = names
        .iter()
        .filter_map(|n| text_width(n, LEGEND_SIZE))
        .max()
        .unwrap_or(0);
    let legend_w = (widest + 52).clamp(110, (WIDTH / 3) as i32);
    Ok(body.split_horizontally(WIDTH as i32 - legend_w))
}

/// One row per name: a colour key (a line, or a filled square for bars) and the name.
fn draw_legend(area: &Area<'_>, names: &[&str], square: bool) -> Result<(), String> {
    let (w, h) = area.dim_in_pixel();
    let style = TextStyle::from((FONT, LEGEND_SIZE).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let rows = ((h as i32 - 24) / LEGEND_ROW).max(1) as usize;
    let top = 24;
    for (i, name) in names.iter().enumerate() {
        let y = top + i as i32 * LEGEND_ROW;
        if i + 1 == rows && names.len() > rows {
            area.draw(&Text::new(
                format!("… ({} more)", names.len() - i),
                (8, y),
                style.clone(),
            ))
            .map_err(err)?;
            break;
        }
        let c = colour(i);
        if square {
            area.draw(&Rectangle::new([(8, y - 7), (22, y + 7)], c.filled()))
                .map_err(err)?;
        } else {
            area.draw(&PathElement::new(vec![(4, y), (26, y)], c.stroke_width(3)))
                .map_err(err)?;
        }
        let label = fit_text(name, LEGEND_SIZE, w as i32 - 40);
        area.draw(&Text::new(label, (32, y), style.clone()))
            .map_err(err)?;
    }
    Ok(())
}

fn colour(i: usize) -> RGBColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

/// Pixel width of `text` in the embedded font.
fn text_width(text: &str, size: f64) -> Option<i32> {
    (FONT, size)
        .into_font()
        .box_size(text)
        .ok()
        .map(|(w, _)| w as i32)
}

/// `text`, or its longest prefix plus "…" that fits in `max_w` pixels.
fn fit_text(text: &str, size: f64, max_w: i32) -> String {
    if text_width(text, size).is_none_or(|w| w <= max_w) {
        return text.to_string();
    }
    let chars: Vec<char> = text.chars().collect();
    for keep in (1..chars.len()).rev() {
        let candidate: String = chars[..keep].iter().chain(['…'].iter()).collect();
        if text_width(&candidate, size).is_some_and(|w| w <= max_w) {
            return candidate;
        }
    }
    "…".to_string()
}

fn format_value(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(0.01..10_000.0).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// `min..max` of `values` widened by `frac` of the span on each side; a zero span is
/// widened to a visible one. `Ok(None)` if there are no values.
fn padded_range(
    values: impl Iterator<Item = f64>,
    frac: f64,
) -> Result<Option<std::ops::Range<f64>>, String> {
    let Some((lo, hi)) = min_max(values) else {
        return Ok(None);
    };
    let span = hi - lo;
    let (lo, hi) = if span > 0.0 {
        (lo - span * frac, hi + span * frac)
    } else {
        let pad = (lo.abs() * 0.1).max(0.5);
        (lo - pad, hi + pad)
    };
    finite_range(lo, hi).map(Some)
}

/// The y range of a bar chart: always includes 0 (bars grow from it), with headroom only
/// on the side(s) where bars are. `Ok(None)` if no value is finite.
fn bar_range(values: impl Iterator<Item = f64>) -> Result<Option<std::ops::Range<f64>>, String> {
    let Some((lo, hi)) = min_max(values) else {
        return Ok(None);
    };
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let span = hi - lo;
    if span == 0.0 {
        return Ok(Some(0.0..1.0));
    }
    let pad = span * 0.08;
    let lo = if lo < 0.0 { lo - pad } else { 0.0 };
    let hi = if hi > 0.0 { hi + pad } else { 0.0 };
    finite_range(lo, hi).map(Some)
}

/// Smallest and largest finite value.
fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((f64::min(lo, v), f64::max(hi, v))),
        })
}

fn finite_range(lo: f64, hi: f64) -> Result<std::ops::Range<f64>, String> {
    if (hi - lo).is_finite() {
        Ok(lo..hi)
    } else {
        Err(format!("values span {lo:e}..{hi:e}, too wide to plot"))
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}
