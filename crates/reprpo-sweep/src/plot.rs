//! The report's chart: per suite, grouped bars (one group per dataset, one bar per
//! configuration) at the mean over seeds, with the 95% interval as an error bar; a failed cell
//! draws no bar but the word "failed" where it would be, a cell with one seed a bar without an
//! error bar. Same size, palette, font (DejaVu Sans, embedded) and atomic write (a temporary
//! `.png` beside the target, renamed) as `reprpo_eval::plot`'s charts.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};
use reprpo_eval::plot::{HEIGHT, PALETTE, TITLE_BAND, WIDTH};

use crate::error::{Result, SweepError};
use crate::fsx::temp_sibling;
use crate::report::{CellStat, Report, SuiteTable};

const FONT: &str = "sans-serif";
const LEGEND_W: u32 = 260;

/// One bar: mean and interval (or failed).
#[derive(Debug, Clone, Copy)]
enum Bar {
    Value { mean: f64, lo: f64, hi: f64 },
    Failed,
    Empty,
}

fn bar(c: &CellStat) -> Bar {
    match (&c.summary, c.status.as_str()) {
        (_, "failed") => Bar::Failed,
        (Some(i), _) => Bar::Value {
            mean: i.mean,
            lo: i.lo.unwrap_or(i.mean),
            hi: i.hi.unwrap_or(i.mean),
        },
        _ => Bar::Empty,
    }
}

/// The y range: 0, 1 (both metrics are fractions) and every mean, with a little headroom.
/// Intervals reaching beyond it are cut at its edge (and drawn without the cap there).
fn y_range(bars: &[Vec<Bar>]) -> std::ops::Range<f64> {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for b in bars.iter().flatten() {
        if let Bar::Value { mean, .. } = *b
            && mean.is_finite()
        {
            lo = lo.min(mean);
            hi = hi.max(mean);
        }
    }
    let pad = 0.05 * (hi - lo);
    (if lo < 0.0 { lo - pad } else { 0.0 })..(hi + pad)
}

fn ensure_font() -> std::result::Result<(), String> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| "DejaVu Sans could not be parsed".to_string())
    })
    .clone()
}

fn colour(i: usize) -> RGBColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

/// Write the chart of suite table `t` to `path`.
pub fn suite_chart(path: &Path, r: &Report, t: &SuiteTable) -> Result<()> {
    let fail = |problem: String| SweepError::Plot {
        path: path.to_path_buf(),
        problem,
    };
    ensure_font().map_err(fail)?;
    // The encoder picks the format from the extension: the temporary name ends in `.png`.
    let mut tmp = temp_sibling(path, "tmp").into_os_string();
    tmp.push(".png");
    let tmp = std::path::PathBuf::from(tmp);
    let drawn = draw(&tmp, r, t);
    if let Err(e) = drawn.and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string())) {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(e));
    }
    Ok(())
}

fn draw(tmp: &Path, r: &Report, t: &SuiteTable) -> std::result::Result<(), String> {
    let root = BitMapBackend::new(tmp, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (band, body) = root.split_vertically(TITLE_BAND);
    let title = format!(
        "{}: suite {}, {} (mean ± {:.0}% CI over seeds)",
        r.name,
        t.suite,
        r.metric,
        100.0 * r.level
    );
    let style = TextStyle::from((FONT, 20.0).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Center));
    band.draw(&Text::new(
        title,
        ((WIDTH / 2) as i32, (TITLE_BAND / 2) as i32),
        style,
    ))
    .map_err(err)?;
    let (plot, legend) = body.split_horizontally(WIDTH - LEGEND_W);
    let bars: Vec<Vec<Bar>> = t
        .rows
        .iter()
        .map(|row| row.cells.iter().map(bar).collect())
        .collect();
    draw_bars(&root, &plot, t, &bars)?;
    draw_legend(&legend, t)?;
    root.present().map_err(err)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// The bars on `plot`; text placed in pixels is drawn on `root` (pixel coordinates are the
/// whole image's).
fn draw_bars(
    root: &Area<'_>,
    plot: &Area<'_>,
    t: &SuiteTable,
    bars: &[Vec<Bar>],
) -> std::result::Result<(), String> {
    let groups = t.columns.len().max(1);
    let yr = y_range(bars);
    let mut chart = ChartBuilder::on(plot)
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..groups as f64, yr.clone())
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .max_light_lines(1)
        .label_style((FONT, 14.0))
        .light_line_style(RGBColor(240, 240, 240))
        .draw()
        .map_err(err)?;
    let width = 0.8 / bars.len().max(1) as f64;
    let failed_style = TextStyle::from((FONT, 12.0).into_font())
        .color(&RGBColor(180, 0, 0))
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    for (i, row) in bars.iter().enumerate() {
        for (g, b) in row.iter().enumerate() {
            let x0 = g as f64 + 0.1 + i as f64 * width;
            match *b {
                Bar::Value { mean, lo, hi } => {
                    chart
                        .draw_series([Rectangle::new(
                            [(x0, 0.0), (x0 + width, mean)],
                            colour(i).filled(),
                        )])
                        .map_err(err)?;
                    for l in error_bar(x0 + width / 2.0, width / 4.0, lo, hi, &yr) {
                        chart
                            .draw_series([PathElement::new(l, BLACK.stroke_width(2))])
                            .map_err(err)?;
                    }
                }
                Bar::Failed => {
                    let (px, py) = chart.backend_coord(&(x0 + width / 2.0, 0.0));
                    root.draw(&Text::new("failed", (px, py - 4), failed_style.clone()))
                        .map_err(err)?;
                }
                Bar::Empty => {}
            }
        }
    }
    let label_style = TextStyle::from((FONT, 14.0).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top));
    for (g, c) in t.columns.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(g as f64 + 0.5, yr.start));
        let text = format!("{} ({})", c.dataset, c.role);
        root.draw(&Text::new(text, (px, py + 8), label_style.clone()))
            .map_err(err)?;
    }
    Ok(())
}

/// The lines of an error bar at `x` from `lo` to `hi`, cut to the range `yr`; a cap (half-width
/// `cap`) at each end that is inside it.
fn error_bar(
    x: f64,
    cap: f64,
    lo: f64,
    hi: f64,
    yr: &std::ops::Range<f64>,
) -> Vec<Vec<(f64, f64)>> {
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return Vec::new();
    }
    let (a, b) = (lo.max(yr.start), hi.min(yr.end));
    let mut lines = vec![vec![(x, a), (x, b)]];
    if lo >= yr.start {
        lines.push(vec![(x - cap, lo), (x + cap, lo)]);
    }
    if hi <= yr.end {
        lines.push(vec![(x - cap, hi), (x + cap, hi)]);
    }
    lines
}

fn draw_legend(area: &Area<'_>, t: &SuiteTable) -> std::result::Result<(), String> {
    let style = TextStyle::from((FONT, 14.0).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for (i, row) in t.rows.iter().enumerate() {
        let y = 24 + 22 * i as i32;
        area.draw(&Rectangle::new(
            [(8, y - 7), (22, y + 7)],
            colour(i).filled(),
        ))
        .map_err(err)?;
        let failed =
            row.runs.starts_with("FAILED") || row.cells.iter().any(|c| c.status == "failed");
        let mut name = row.label.clone();
        if row.is_baseline {
            name.push_str(" (baseline)");
        }
        if failed {
            name.push_str(" FAILED");
        }
        let name: String = name.chars().take(34).collect();
        area.draw(&Text::new(name, (30, y), style.clone()))
            .map_err(err)?;
    }
    Ok(())
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}
