//! Heatmaps: grids of values as coloured cells, in panels (e.g. one per kind of difference, or
//! one per completion), with a colour bar under them.
//!
//! A panel is drawn top row first with its row labels on the left; when it has more columns than
//! pixels, neighbouring columns are averaged into one pixel column (so a 4096-neuron row is a
//! faithful, smoothed strip). Non-finite cells are grey. The chart has the same size, title
//! band, font and atomic write as the other charts (see the parent module).

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{Area, FONT, LABEL_SIZE, PlotError, err, fit_text, title_band, write_atomic};

/// One grid of a [`heatmap`].
#[derive(Debug, Clone, PartialEq)]
pub struct HeatPanel {
    /// The panel's title.
    pub title: String,
    /// One label per row (e.g. the layer).
    pub row_labels: Vec<String>,
    /// `rows[r][c]`; rows may differ in length (shorter rows leave white space on the right).
    pub rows: Vec<Vec<f64>>,
}

/// How values become colours.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ColourScale {
    /// `0..=max` from dark blue through green to yellow (viridis); values outside are clipped.
    Sequential {
        /// The value drawn yellow.
        max: f64,
    },
    /// `-limit..=limit` from blue through white to red; values outside are clipped.
    Diverging {
        /// The value drawn full red (its negative full blue).
        limit: f64,
    },
}

const VIRIDIS: [(f64, f64, f64); 5] = [
    (68.0, 1.0, 84.0),
    (59.0, 82.0, 139.0),
    (33.0, 145.0, 140.0),
    (94.0, 201.0, 98.0),
    (253.0, 231.0, 37.0),
];
const BLUE: (f64, f64, f64) = (59.0, 76.0, 192.0);
const RED: (f64, f64, f64) = (180.0, 4.0, 38.0);
const WHITE_RGB: (f64, f64, f64) = (247.0, 247.0, 247.0);
const GREY: RGBColor = RGBColor(190, 190, 190);
const CAPTION_BAND: u32 = 56;
const PANEL_TITLE: i32 = 22;
const ROW_LABEL_W: i32 = 44;

fn mix(a: (f64, f64, f64), b: (f64, f64, f64), t: f64) -> RGBColor {
    let f = |x: f64, y: f64| (x + (y - x) * t).round().clamp(0.0, 255.0) as u8;
    RGBColor(f(a.0, b.0), f(a.1, b.1), f(a.2, b.2))
}

impl ColourScale {
    /// The colour of `v`.
    pub fn colour(self, v: f64) -> RGBColor {
        if !v.is_finite() {
            return GREY;
        }
        match self {
            ColourScale::Sequential { max } => {
                let t = if max > 0.0 {
                    (v / max).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let x = t * (VIRIDIS.len() - 1) as f64;
                let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
                mix(VIRIDIS[i], VIRIDIS[i + 1], x - i as f64)
            }
            ColourScale::Diverging { limit } => {
                let t = if limit > 0.0 {
                    (v / limit).clamp(-1.0, 1.0)
                } else {
                    0.0
                };
                if t >= 0.0 {
                    mix(WHITE_RGB, RED, t)
                } else {
                    mix(WHITE_RGB, BLUE, -t)
                }
            }
        }
    }

    fn ends(self) -> (f64, f64) {
        match self {
            ColourScale::Sequential { max } => (0.0, max),
            ColourScale::Diverging { limit } => (-limit, limit),
        }
    }
}

/// Average `row` into `width` bins (or one bin per value when it has fewer).
fn bins(row: &[f64], width: usize) -> Vec<f64> {
    if row.len() <= width {
        return row.to_vec();
    }
    (0..width)
        .map(|b| {
            let (lo, hi) = (
                b * row.len() / width,
                ((b + 1) * row.len() / width).max(b + 1),
            );
            let vals: Vec<f64> = row[lo..hi.min(row.len())].to_vec();
            vals.iter().sum::<f64>() / vals.len().max(1) as f64
        })
        .collect()
}

fn draw_panel(area: &Area<'_>, p: &HeatPanel, scale: ColourScale) -> Result<(), String> {
    let (w, h) = area.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    let title = TextStyle::from((FONT, LABEL_SIZE).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Center));
    let label = fit_text(&p.title, LABEL_SIZE, w - 8);
    area.draw(&Text::new(label, (w / 2, PANEL_TITLE / 2), title))
        .map_err(err)?;
    let (x0, y0) = (ROW_LABEL_W, PANEL_TITLE + 2);
    let (gw, gh) = (w - ROW_LABEL_W - 8, h - PANEL_TITLE - 8);
    let n_rows = p.rows.len().max(1) as i32;
    let n_cols = p.rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let row_style = TextStyle::from((FONT, 12.0).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Right, VPos::Center));
    for (r, row) in p.rows.iter().enumerate() {
        let (top, bottom) = (
            y0 + r as i32 * gh / n_rows,
            y0 + (r as i32 + 1) * gh / n_rows,
        );
        // This row's share of the width (shorter rows are narrower), one bin per pixel at most.
        let cells_w = (gw.max(1) as usize * row.len() / n_cols).max(1);
        let cells = bins(row, cells_w);
        for (c, v) in cells.iter().enumerate() {
            let left = x0 + (c * cells_w / cells.len().max(1)) as i32;
            let right = x0 + ((c + 1) * cells_w / cells.len().max(1)) as i32;
            area.draw(&Rectangle::new(
                [(left, top), (right.max(left + 1), bottom)],
                scale.colour(*v).filled(),
            ))
            .map_err(err)?;
        }
        if let Some(l) = p.row_labels.get(r) {
            area.draw(&Text::new(
                l.clone(),
                (x0 - 4, (top + bottom) / 2),
                row_style.clone(),
            ))
            .map_err(err)?;
        }
    }
    Ok(())
}

fn draw_colour_bar(area: &Area<'_>, scale: ColourScale, caption: &str) -> Result<(), String> {
    let (w, _) = area.dim_in_pixel();
    let w = w as i32;
    let (bar_l, bar_r) = (w / 2 - 160, w / 2 + 160);
    let (lo, hi) = scale.ends();
    for x in bar_l..bar_r {
        let v = lo + (hi - lo) * f64::from(x - bar_l) / f64::from(bar_r - bar_l - 1);
        area.draw(&Rectangle::new(
            [(x, 6), (x + 1, 20)],
            scale.colour(v).filled(),
        ))
        .map_err(err)?;
    }
    let small = |hp| {
        TextStyle::from((FONT, 12.0).into_font())
            .color(&BLACK)
            .pos(Pos::new(hp, VPos::Center))
    };
    area.draw(&Text::new(
        super::format_value(lo),
        (bar_l - 6, 13),
        small(HPos::Right),
    ))
    .map_err(err)?;
    area.draw(&Text::new(
        super::format_value(hi),
        (bar_r + 6, 13),
        small(HPos::Left),
    ))
    .map_err(err)?;
    let text = fit_text(caption, 13.0, w - 16);
    area.draw(&Text::new(text, (w / 2, 38), small(HPos::Center)))
        .map_err(err)
}

/// Draw `panels` in a grid of `columns` columns (row by row), the colour bar of `scale` and
/// `caption` under them, and write the PNG to `path`.
pub fn heatmap(
    path: &std::path::Path,
    title: &str,
    panels: &[HeatPanel],
    columns: usize,
    scale: ColourScale,
    caption: &str,
) -> Result<(), PlotError> {
    let columns = columns.clamp(1, panels.len().max(1));
    let grid_rows = panels.len().div_ceil(columns).max(1);
    write_atomic(path, |root| {
        let body = title_band(root, title)?;
        let (_, h) = body.dim_in_pixel();
        let (grid, bar) = body.split_vertically(h.saturating_sub(CAPTION_BAND));
        if panels.is_empty() {
            return super::no_data(&grid);
        }
        let areas = grid.split_evenly((grid_rows, columns));
        for (a, p) in areas.iter().zip(panels) {
            draw_panel(a, p, scale)?;
        }
        draw_colour_bar(&bar, scale, caption)
    })
}
