//! Timeline charts: several series of `(seconds, value)` on one time axis, with the
//! steps of a run marked, drawn into a PNG. The demo draws its resize with it; benchmarks
//! that sample figures over time can use the same helper.
//!
//! Samples come as CSV (see [`Timeline::parse_csv`]): a header `t_s,NAME,NAME...`, one
//! row per sample (an empty cell is a missing sample), and `# mark SECONDS LABEL` lines
//! for the steps.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// One line of the chart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// `(seconds, value)` in time order.
    pub points: Vec<(f64, f64)>,
}

/// A step of the run, drawn as a vertical line with its label.
#[derive(Clone, Debug, PartialEq)]
pub struct Mark {
    /// When, in seconds.
    pub at_s: f64,
    /// What happened.
    pub label: String,
}

/// A chart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timeline {
    /// Title above the chart.
    pub title: String,
    /// What the values are (e.g. "MiB").
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
    /// The steps.
    pub marks: Vec<Mark>,
}

/// Why a chart could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// No font file: the chart needs one for its text.
    #[error(
        "no font for the chart's text (looked for {0}): install fonts-dejavu-core (ci/setup does)"
    )]
    NoFont(String),
    /// The CSV is malformed.
    #[error("line {line}: {why}")]
    Csv {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// Nothing to draw.
    #[error("no samples to draw")]
    Empty,
    /// Drawing or writing the PNG failed.
    #[error("cannot draw {path}: {why}")]
    Draw {
        /// The PNG path.
        path: String,
        /// What failed.
        why: String,
    },
}

/// Font files tried, in order.
pub const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn ensure_font() -> Result<(), PlotError> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        FONTS.iter().any(|p| {
            std::fs::read(p).is_ok_and(|bytes| {
                // Registered once for the process: plotters keeps a 'static reference.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            })
        })
    });
    if ok {
        Ok(())
    } else {
        Err(PlotError::NoFont(FONTS.join(", ")))
    }
}

impl Timeline {
    /// Reads samples from CSV text: `t_s,NAME...` header, rows of numbers (empty cells
    /// skipped), `# mark SECONDS LABEL` lines, other `#` lines ignored. Values are divided
    /// by `scale` (e.g. 1048576 for MiB).
    ///
    /// # Errors
    ///
    /// [`PlotError::Csv`] naming the line.
    pub fn parse_csv(text: &str, scale: f64) -> Result<Self, PlotError> {
        let mut t = Timeline::default();
        let bad = |line: usize, why: String| PlotError::Csv { line, why };
        let mut header_seen = false;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let l = raw.trim();
            if l.is_empty() {
                continue;
            }
            if let Some(c) = l.strip_prefix('#') {
                if let Some(m) = c.trim().strip_prefix("mark ") {
                    let (at, label) = m.trim().split_once(' ').unwrap_or((m.trim(), ""));
                    let at_s = at
                        .parse()
                        .map_err(|_| bad(n, format!("mark time '{at}' is not a number")))?;
                    t.marks.push(Mark {
                        at_s,
                        label: label.trim().to_string(),
                    });
                }
                continue;
            }
            let cells: Vec<&str> = l.split(',').map(str::trim).collect();
            if !header_seen {
                if cells.first() != Some(&"t_s") {
                    return Err(bad(n, "the header must start with t_s".into()));
                }
                t.series = cells[1..]
                    .iter()
                    .map(|name| Series {
                        name: (*name).to_string(),
                        points: Vec::new(),
                    })
                    .collect();
                header_seen = true;
                continue;
            }
            if cells.len() != t.series.len() + 1 {
                return Err(bad(
                    n,
                    format!(
                        "{} cells, the header has {}",
                        cells.len(),
                        t.series.len() + 1
                    ),
                ));
            }
            let at: f64 = cells[0]
                .parse()
                .map_err(|_| bad(n, format!("time '{}' is not a number", cells[0])))?;
            for (s, cell) in t.series.iter_mut().zip(&cells[1..]) {
                if cell.is_empty() {
                    continue;
                }
                let v: f64 = cell
                    .parse()
                    .map_err(|_| bad(n, format!("'{cell}' is not a number")))?;
                s.points.push((at, v / scale));
            }
        }
        if !header_seen {
            return Err(bad(1, "no header".into()));
        }
        Ok(t)
    }

    /// The x and y ranges covering every point and mark (never empty).
    pub fn bounds(&self) -> Option<((f64, f64), (f64, f64))> {
        let pts = self.series.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
        let mut any = false;
        for &(x, y) in pts {
            any = true;
            x0 = x0.min(x);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        if !any {
            return None;
        }
        for m in &self.marks {
            x0 = x0.min(m.at_s);
            x1 = x1.max(m.at_s);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let y1 = if y1 <= 0.0 { 1.0 } else { y1 * 1.08 };
        Some(((x0, x1), (0.0, y1)))
    }

    /// Draws the chart into a `width` x `height` PNG at `path`.
    ///
    /// # Errors
    ///
    /// [`PlotError::Empty`], [`PlotError::NoFont`] or [`PlotError::Draw`].
    pub fn draw_png(&self, path: &Path, width: u32, height: u32) -> Result<(), PlotError> {
        let ((x0, x1), (y0, y1)) = self.bounds().ok_or(PlotError::Empty)?;
        ensure_font()?;
        let draw_err = |e: &dyn std::fmt::Display| PlotError::Draw {
            path: path.display().to_string(),
            why: e.to_string(),
        };
        let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| draw_err(&e))?;
        chart
            .configure_mesh()
            .x_desc("time (s)")
            .y_desc(self.y_label.as_str())
            .draw()
            .map_err(|e| draw_err(&e))?;
        const COLORS: [RGBColor; 6] = [
            RGBColor(31, 119, 180),
            RGBColor(214, 39, 40),
            RGBColor(44, 160, 44),
            RGBColor(148, 103, 189),
            RGBColor(255, 127, 14),
            RGBColor(23, 190, 207),
        ];
        for (i, s) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(steps(&s.points), color.stroke_width(2)))
                .map_err(|e| draw_err(&e))?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        let grey = RGBColor(90, 90, 90);
        for m in &self.marks {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(m.at_s, y0), (m.at_s, y1)],
                    grey.stroke_width(1),
                )))
                .map_err(|e| draw_err(&e))?;
            chart
                .draw_series(std::iter::once(Text::new(
                    m.label.clone(),
                    (m.at_s, y1 * 0.97),
                    ("sans-serif", 15).into_font().color(&grey),
                )))
                .map_err(|e| draw_err(&e))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::MiddleMiddle)
            .draw()
            .map_err(|e| draw_err(&e))?;
        root.present().map_err(|e| draw_err(&e))?;
        Ok(())
    }
}

/// Sample-and-hold: a value holds until the next sample, so a line never suggests figures
/// between samples that nobody measured.
pub fn steps(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len() * 2);
    for (i, &(x, y)) in points.iter().enumerate() {
        if i > 0 {
            out.push((x, points[i - 1].1));
        }
        out.push((x, y));
    }
    out
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;

    const CSV: &str = "# a comment\nt_s,requested,plugged\n# mark 0.5 grow\n0,0,0\n1,2048,\n2,2048,1024\n3,0,2048\n# mark 3 shrink\n";

    #[test]
    fn csv_gives_series_marks_and_scaled_values() {
        let t = Timeline::parse_csv(CSV, 1024.0).unwrap();
        assert_eq!(t.series.len(), 2);
        assert_eq!(
            t.series[0].points,
            vec![(0.0, 0.0), (1.0, 2.0), (2.0, 2.0), (3.0, 0.0)]
        );
        assert_eq!(
            t.series[1].points,
            vec![(0.0, 0.0), (2.0, 1.0), (3.0, 2.0)],
            "empty cell skipped"
        );
        assert_eq!(t.marks.len(), 2);
        assert_eq!((t.marks[0].at_s, t.marks[0].label.as_str()), (0.5, "grow"));
        assert_eq!(t.bounds().unwrap().0, (0.0, 3.0));
    }

    #[test]
    fn values_hold_until_the_next_sample() {
        assert_eq!(
            steps(&[(0.0, 1.0), (1.0, 3.0), (2.0, 2.0)]),
            vec![(0.0, 1.0), (1.0, 1.0), (1.0, 3.0), (2.0, 3.0), (2.0, 2.0)]
        );
        assert!(steps(&[]).is_empty());
    }

    #[test]
    fn malformed_csv_names_the_line() {
        for (text, line) in [
            ("x,y\n", 1),
            ("t_s,a\n1,2,3\n", 2),
            ("t_s,a\n1,zz\n", 2),
            ("t_s,a\n# mark soon x\n", 2),
            ("", 1),
        ] {
            match Timeline::parse_csv(text, 1.0) {
                Err(PlotError::Csv { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_png_is_written_and_nothing_to_draw_is_an_error() {
        let dir = std::env::temp_dir().join(format!("plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join("t.png");
        let t = Timeline {
            title: "test".into(),
            y_label: "MiB".into(),
            ..Timeline::parse_csv(CSV, 1.0).unwrap()
        };
        // The font is a dependency ci/setup installs: its absence fails the test.
        t.draw_png(&png, 640, 360).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 2000, "{} bytes", bytes.len());
        let empty = Timeline::default();
        assert!(matches!(
            empty.draw_png(&png, 64, 64),
            Err(PlotError::Empty)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
