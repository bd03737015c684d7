//! The line chart of the report, drawn with plotters into a PNG. Text uses the
//! Noto Sans font compiled into the binary, so a machine without fonts draws
//! the same chart.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// What plotters' bitmap backend fails with (its error type is not exported).
type DrawError = DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>;

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("the bundled font is not a usable TrueType font")]
    Font,
    #[error("drawing {path}")]
    Draw {
        path: PathBuf,
        #[source]
        source: DrawError,
    },
}

const SIZE: (u32, u32) = (1100, 680);
const FONT: &str = "sans-serif";
const COLORS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x17, 0x17, 0x17),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
];
const INK: RGBColor = RGBColor(0x20, 0x20, 0x20);
const GRID: RGBColor = RGBColor(0xdd, 0xdd, 0xdd);

/// plotters looks fonts up by family name; ours is registered once per process.
fn register_bundled_font() -> Result<(), ChartError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok =
        *REGISTERED.get_or_init(|| register_font(FONT, FontStyle::Normal, ttf_noto_sans::REGULAR).is_ok());
    ok.then_some(()).ok_or(ChartError::Font)
}

/// An axis whose grid lines and labels sit exactly at `ticks`, linear or
/// logarithmic, with `margin` (a fraction of the length) kept clear at each
/// end so the first and last points do not sit on the frame.
#[derive(Clone)]
struct Axis {
    range: Range<f64>,
    log: bool,
    margin: f64,
    ticks: Vec<f64>,
}

impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let Range { start, end } = self.range;
        let t = if end <= start {
            0.5
        } else if self.log {
            (value.ln() - start.ln()) / (end.ln() - start.ln())
        } else {
            (value - start) / (end - start)
        };
        let t = self.margin + t * (1.0 - 2.0 * self.margin);
        limit.0 + (t * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // Only bold grid lines: the light ones would repeat them.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

/// A "nice" tick step for a range of `span` with about `count` ticks.
fn nice_step(span: f64, count: f64) -> f64 {
    let raw = (span / count).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn label(v: f64) -> String {
    if v >= 1000.0 && (v / 1000.0).fract() == 0.0 {
        format!("{}K", v / 1000.0)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn plottable(p: &(f64, f64)) -> bool {
    p.0.is_finite() && p.1.is_finite() && p.0 > 0.0
}

/// The x axis: a tick at every x of the data, on a log scale when the data
/// spans ≥ 10×.
fn x_axis(points: &[(f64, f64)]) -> Axis {
    let mut ticks: Vec<f64> = points.iter().map(|p| p.0).collect();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    let (lo, hi) = match (ticks.first(), ticks.last()) {
        (Some(&lo), Some(&hi)) => (lo, hi),
        _ => (1.0, 1.0),
    };
    Axis {
        range: lo..hi,
        log: hi / lo >= 10.0,
        margin: 0.04,
        ticks,
    }
}

/// The y axis: from 0 to a round value above the data, about six ticks.
fn y_axis(points: &[(f64, f64)]) -> Axis {
    let top = points.iter().fold(0.0f64, |m, p| m.max(p.1));
    let step = nice_step(top.max(1.0), 6.0);
    let max = (top / step).ceil().max(1.0) * step;
    let ticks = (0..)
        .map(|k| f64::from(k) * step)
        .take_while(|y| *y <= max + step / 2.0)
        .collect();
    Axis {
        range: 0.0..max,
        log: false,
        margin: 0.0,
        ticks,
    }
}

/// Draws the series (x on a log scale when it spans ≥ 10×) and writes a PNG.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), ChartError> {
    register_bundled_font()?;
    draw(path, title, x_label, y_label, series).map_err(|source| ChartError::Draw {
        path: path.to_owned(),
        source,
    })
}

fn draw(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<(), DrawError> {
    let points: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(plottable)
        .collect();
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 32).into_font().color(&INK))
        .margin(20)
        .margin_right(30)
        .x_label_area_size(70)
        .y_label_area_size(90)
        .build_cartesian_2d(x_axis(&points), y_axis(&points))?;
    let tick_label = |v: &f64| label(*v);
    chart
        .configure_mesh()
        .bold_line_style(GRID)
        .axis_style(INK.stroke_width(2))
        .label_style((FONT, 22).into_font().color(&INK))
        .axis_desc_style((FONT, 22).into_font().color(&INK))
        .x_label_formatter(&tick_label)
        .y_label_formatter(&tick_label)
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()?;
    for (s, color) in series.iter().zip(COLORS.iter().cycle()) {
        let line: Vec<(f64, f64)> = s.points.iter().copied().filter(plottable).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(3)))?
            .label(s.name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 20, y + 6)], color.filled()));
        chart.draw_series(
            line.into_iter()
                .map(|p| EmptyElement::at(p) + Rectangle::new([(-4, -4), (4, 4)], color.filled())),
        )?;
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .margin(15)
            .background_style(WHITE)
            .border_style(GRID)
            .label_font((FONT, 22).into_font().color(&INK))
            .draw()?;
    }
    root.present()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PNG's width and height, from its signature and IHDR chunk.
    fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
        let signature = b"\x89PNG\r\n\x1a\n";
        if bytes.len() < 24 || &bytes[..8] != signature || &bytes[12..16] != b"IHDR" {
            return None;
        }
        let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        Some((be(16), be(20)))
    }

    fn render(name: &str, series: &[Series]) -> Vec<u8> {
        let path = std::env::temp_dir().join(format!("bench-chart-{}-{name}.png", std::process::id()));
        line_chart(
            &path,
            "connect latency p50, target service last",
            "number of services",
            "microseconds",
            series,
        )
        .expect("the chart renders");
        let bytes = std::fs::read(&path).expect("the chart was written");
        std::fs::remove_file(&path).expect("removing the chart");
        bytes
    }

    #[test]
    fn renders_a_compressed_png_of_the_chart_size() {
        let series: Vec<Series> = ["bare", "iptables-nft", "redirector"]
            .iter()
            .enumerate()
            .map(|(k, name)| Series {
                name: (*name).to_owned(),
                points: [1_000.0, 10_000.0, 30_000.0, 100_000.0]
                    .iter()
                    .map(|&n| (n, 25.0 + k as f64 * n / 1_000.0))
                    .collect(),
            })
            .collect();
        let png = render("lanes", &series);
        assert_eq!(png_size(&png), Some(SIZE));
        // Text and lines make it well above a blank page; raw pixels would be
        // 1100 × 680 × 3 = 2.2 MB.
        assert!((10_000..300_000).contains(&png.len()), "{} bytes", png.len());
    }

    #[test]
    fn renders_without_data() {
        // A run that skips the lanes still writes the (empty) chart.
        let png = render("empty", &[]);
        assert_eq!(png_size(&png), Some(SIZE));
    }

    #[test]
    fn x_is_logarithmic_from_ten_times_with_a_tick_per_n() {
        let wide = x_axis(&[(1_000.0, 1.0), (100_000.0, 2.0), (10_000.0, 3.0), (1_000.0, 4.0)]);
        assert!(wide.log);
        assert_eq!(wide.ticks, [1_000.0, 10_000.0, 100_000.0]);
        // Midway in log space: 10K sits in the middle of the plot.
        assert_eq!(wide.map(&10_000.0, (0, 1000)), 500);
        assert_eq!(wide.map(&1_000.0, (0, 1000)), 40);
        assert!(!x_axis(&[(100.0, 1.0), (900.0, 1.0)]).log);
    }

    #[test]
    fn y_runs_from_zero_to_a_round_value_above_the_data() {
        let y = y_axis(&[(1.0, 447.0)]);
        assert_eq!(y.range, 0.0..500.0);
        assert_eq!(y.ticks, [0.0, 100.0, 200.0, 300.0, 400.0, 500.0]);
    }

    #[test]
    fn labels_thousands_with_k() {
        assert_eq!(label(30_000.0), "30K");
        assert_eq!(label(400.0), "400");
        assert_eq!(label(2.5), "2.5");
    }
}
