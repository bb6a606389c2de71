//! `tributary bench report`: medians over rounds, ratios against one broker, and a chart.
//!
//! Input is what `tributary bench <protocol> --json --broker NAME --label WORKLOAD` prints, one
//! report per line, every round of every broker. A line with `"protocol": "disk"` carries a
//! reference bandwidth (the compare script's dd measurement) in `mb_per_sec`.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::Report;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("line {line}: not a bench report: {source}")]
    Parse {
        line: usize,
        source: serde_json::Error,
    },
    #[error("drawing the chart: {0}")]
    Chart(String),
}

/// Reads one JSON report per non-empty line.
pub fn parse_lines(text: &str) -> Result<Vec<Report>, ReportError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| ReportError::Parse {
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// Reads one number off a row, for a chart panel.
type Metric = fn(&Row) -> f64;

/// The medians of one broker on one workload.
#[derive(Debug, Clone)]
pub struct Row {
    pub workload: String,
    pub broker: String,
    pub rounds: usize,
    pub msgs_per_sec: f64,
    pub mb_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub rss_kib_per_1000_conn: Option<f64>,
    /// subject / this broker, MB/s (only on rows that are not the subject).
    pub throughput_ratio: Option<f64>,
    /// subject / this broker, p99 latency (below 1 = the subject is faster).
    pub p99_ratio: Option<f64>,
    /// Broker CPU time per delivered message, microseconds (rounds that measured it).
    pub broker_cpu_us_per_msg: Option<f64>,
    /// this broker / subject, CPU per delivered message (above 1 = the subject uses less).
    pub cpu_ratio: Option<f64>,
}

/// Every workload with its brokers' medians, in the order the workloads first appear.
#[derive(Debug, Clone)]
pub struct Summary {
    pub subject: String,
    pub rows: Vec<Row>,
}

/// Columns of the text and Markdown tables.
const COLUMNS: usize = 12;

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a > 0.0).then(|| a / b)
}

impl Summary {
    pub fn new(reports: &[Report], subject: &str) -> Self {
        let mut order: Vec<(String, String)> = Vec::new();
        let mut groups: BTreeMap<(String, String), Vec<&Report>> = BTreeMap::new();
        for r in reports {
            let workload = if r.label.is_empty() {
                r.protocol.clone()
            } else {
                r.label.clone()
            };
            let broker = if r.broker.is_empty() {
                r.target.clone()
            } else {
                r.broker.clone()
            };
            let key = (workload, broker);
            if !groups.contains_key(&key) {
                order.push(key.clone());
            }
            groups.entry(key).or_default().push(r);
        }
        let mut rows: Vec<Row> = order
            .iter()
            .map(|key| {
                let rs = &groups[key];
                let rss: Vec<f64> = rs.iter().filter_map(|r| r.rss_kib_per_1000_conn).collect();
                let cpu: Vec<f64> = rs.iter().filter_map(|r| r.broker_cpu_us_per_msg).collect();
                Row {
                    workload: key.0.clone(),
                    broker: key.1.clone(),
                    rounds: rs.len(),
                    msgs_per_sec: median(rs.iter().map(|r| r.msgs_per_sec).collect()),
                    mb_per_sec: median(rs.iter().map(|r| r.mb_per_sec).collect()),
                    p50_ms: median(rs.iter().map(|r| r.p50_ms).collect()),
                    p99_ms: median(rs.iter().map(|r| r.p99_ms).collect()),
                    rss_kib_per_1000_conn: (!rss.is_empty()).then(|| median(rss)),
                    throughput_ratio: None,
                    p99_ratio: None,
                    broker_cpu_us_per_msg: (!cpu.is_empty()).then(|| median(cpu)),
                    cpu_ratio: None,
                }
            })
            .collect();
        // Keep each workload's rows together, subject first.
        let workloads: Vec<String> = {
            let mut seen = Vec::new();
            for r in &rows {
                if !seen.contains(&r.workload) {
                    seen.push(r.workload.clone());
                }
            }
            seen
        };
        rows.sort_by_key(|r| {
            (
                workloads.iter().position(|w| *w == r.workload),
                r.broker != subject,
            )
        });
        let subjects: BTreeMap<String, (f64, f64, Option<f64>)> = rows
            .iter()
            .filter(|r| r.broker == subject)
            .map(|r| {
                let values = (r.mb_per_sec, r.p99_ms, r.broker_cpu_us_per_msg);
                (r.workload.clone(), values)
            })
            .collect();
        for r in rows.iter_mut().filter(|r| r.broker != subject) {
            if let Some(&(mb, p99, cpu)) = subjects.get(&r.workload) {
                r.throughput_ratio = ratio(mb, r.mb_per_sec);
                r.p99_ratio = ratio(p99, r.p99_ms);
                r.cpu_ratio = r
                    .broker_cpu_us_per_msg
                    .zip(cpu)
                    .and_then(|(it, s)| ratio(it, s));
            }
        }
        Self {
            subject: subject.to_string(),
            rows,
        }
    }

    fn cells(&self) -> Vec<[String; COLUMNS]> {
        let opt = |v: Option<f64>, digits: usize| {
            v.map_or_else(|| "-".to_string(), |x| format!("{x:.digits$}"))
        };
        self.rows
            .iter()
            .map(|r| {
                [
                    r.workload.clone(),
                    r.broker.clone(),
                    r.rounds.to_string(),
                    if r.msgs_per_sec > 0.0 {
                        format!("{:.0}", r.msgs_per_sec)
                    } else {
                        "-".into()
                    },
                    format!("{:.1}", r.mb_per_sec),
                    if r.p50_ms > 0.0 {
                        format!("{:.2}", r.p50_ms)
                    } else {
                        "-".into()
                    },
                    if r.p99_ms > 0.0 {
                        format!("{:.2}", r.p99_ms)
                    } else {
                        "-".into()
                    },
                    opt(r.rss_kib_per_1000_conn, 0),
                    opt(r.broker_cpu_us_per_msg, 1),
                    opt(r.throughput_ratio, 2),
                    opt(r.p99_ratio, 2),
                    opt(r.cpu_ratio, 2),
                ]
            })
            .collect()
    }

    fn header(&self) -> [String; COLUMNS] {
        [
            "workload".into(),
            "broker".into(),
            "rounds".into(),
            "msg/s".into(),
            "MB/s".into(),
            "p50 ms".into(),
            "p99 ms".into(),
            "KiB/1k conn".into(),
            "cpu µs/msg".into(),
            format!("{} / it (MB/s)", self.subject),
            format!("{} / it (p99)", self.subject),
            format!("it / {} (CPU)", self.subject),
        ]
    }

    /// A plain-text table (medians over rounds).
    pub fn table(&self) -> String {
        let header = self.header();
        let cells = self.cells();
        // Characters, not bytes: `{:>w$}` pads to characters and the CPU header has a 'µ'.
        let widths: Vec<usize> = (0..header.len())
            .map(|i| {
                cells
                    .iter()
                    .map(|c| c[i].chars().count())
                    .chain([header[i].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |c: &[String; COLUMNS]| {
            c.iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (s, w))| {
                    if i < 2 {
                        format!("{s:<w$}")
                    } else {
                        format!("{s:>w$}")
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        let mut out = line(&header) + "\n";
        for c in &cells {
            out += &line(c);
            out.push('\n');
        }
        out
    }

    /// The same table in Markdown.
    pub fn markdown(&self) -> String {
        let header = self.header();
        let mut out = format!("| {} |\n", header.join(" | "));
        out += &format!(
            "|{}\n",
            header
                .iter()
                .enumerate()
                .map(|(i, _)| if i < 2 { "---|" } else { "---:|" })
                .collect::<String>()
        );
        for c in self.cells() {
            out += &format!("| {} |\n", c.join(" | "));
        }
        out
    }

    /// Two horizontal bar charts, one above the other (log scale): MB/s and p99 latency per
    /// workload, one bar per broker.
    pub fn chart(&self, path: &Path) -> Result<(), ReportError> {
        let mut workloads: Vec<String> = Vec::new();
        let mut brokers: Vec<String> = Vec::new();
        for r in &self.rows {
            if !workloads.contains(&r.workload) {
                workloads.push(r.workload.clone());
            }
            if !brokers.contains(&r.broker) {
                brokers.push(r.broker.clone());
            }
        }
        let n = workloads.len().max(1);
        let panel_height = 90 + 46 * n as u32;
        let root = SVGBackend::new(path, (1100, panel_height * 2)).into_drawing_area();
        let chart_err = |e: &dyn std::fmt::Display| ReportError::Chart(e.to_string());
        root.fill(&WHITE).map_err(|e| chart_err(&e))?;
        let panels = root.split_evenly((2, 1));
        let metrics: [(&str, Metric); 2] = [
            ("throughput, MB/s (log scale, longer is better)", |r| {
                r.mb_per_sec
            }),
            (
                "p99 end-to-end latency, ms (log scale, shorter is better)",
                |r| r.p99_ms,
            ),
        ];
        for (panel, (title, value)) in panels.iter().zip(metrics) {
            let values: Vec<f64> = self.rows.iter().map(value).filter(|v| *v > 0.0).collect();
            let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = values.iter().copied().fold(0.0, f64::max);
            // Headroom on the right keeps the legend clear of the longest bar.
            let (lo, hi) = if values.is_empty() {
                (0.1, 10.0)
            } else {
                (lo / 2.0, hi * 10.0)
            };
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 18))
                .margin(14)
                .x_label_area_size(30)
                .y_label_area_size(210)
                .build_cartesian_2d((lo..hi).log_scale(), 0f64..n as f64)
                .map_err(|e| chart_err(&e))?;
            // Workload i occupies y in [n-1-i, n-i): the first one on top.
            let names = workloads.clone();
            chart
                .configure_mesh()
                .disable_y_mesh()
                .y_labels(n * 2 + 1)
                .y_label_formatter(&move |y| {
                    let slot = y.floor();
                    if (y - slot - 0.5).abs() < 0.01 && slot >= 0.0 {
                        let i = n - 1 - slot as usize;
                        names.get(i).cloned().unwrap_or_default()
                    } else {
                        String::new()
                    }
                })
                .label_style(("sans-serif", 13))
                .draw()
                .map_err(|e| chart_err(&e))?;
            for (b, broker) in brokers.iter().enumerate() {
                let color = Palette99::pick(b).to_rgba();
                let bars: Vec<Rectangle<(f64, f64)>> = self
                    .rows
                    .iter()
                    .filter(|r| r.broker == *broker && value(r) > 0.0)
                    .filter_map(|r| {
                        let i = workloads.iter().position(|x| *x == r.workload)?;
                        // Bars of the brokers that ran this workload share its slot.
                        let here: Vec<&String> = brokers
                            .iter()
                            .filter(|b| {
                                self.rows.iter().any(|x| {
                                    x.workload == r.workload && x.broker == **b && value(x) > 0.0
                                })
                            })
                            .collect();
                        let k = here.iter().position(|b| *b == broker)?;
                        let slot = 0.8 / here.len() as f64;
                        let y0 = (n - 1 - i) as f64 + 0.1 + slot * k as f64;
                        Some(Rectangle::new(
                            [(lo, y0), (value(r), y0 + slot * 0.9)],
                            color.filled(),
                        ))
                    })
                    .collect();
                chart
                    .draw_series(bars)
                    .map_err(|e| chart_err(&e))?
                    .label(broker.clone())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                    });
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(|e| chart_err(&e))?;
        }
        root.present().map_err(|e| chart_err(&e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(label: &str, broker: &str, mb: f64, p99: f64) -> Report {
        Report {
            protocol: "mqtt".into(),
            label: label.into(),
            broker: broker.into(),
            msgs_per_sec: mb * 1000.0,
            mb_per_sec: mb,
            p99_ms: p99,
            ..Default::default()
        }
    }

    #[test]
    fn medians_and_ratios_per_workload() {
        let rs = vec![
            report("qos1", "mosquitto", 10.0, 4.0),
            report("qos1", "tributary", 30.0, 1.0),
            report("qos1", "mosquitto", 20.0, 2.0),
            report("qos1", "tributary", 10.0, 3.0),
            report("qos1", "mosquitto", 30.0, 8.0),
            report("qos1", "tributary", 20.0, 2.0),
            report("fanout", "mosquitto", 5.0, 1.0),
        ];
        let s = Summary::new(&rs, "tributary");
        assert_eq!(s.rows.len(), 3);
        let t = &s.rows[0];
        assert_eq!((t.broker.as_str(), t.rounds), ("tributary", 3));
        assert_eq!((t.mb_per_sec, t.p99_ms), (20.0, 2.0));
        let m = &s.rows[1];
        assert_eq!(m.mb_per_sec, 20.0);
        assert_eq!(m.throughput_ratio, Some(1.0));
        assert_eq!(m.p99_ratio, Some(0.5));
        // A workload the subject did not run has no ratio.
        assert_eq!(s.rows[2].throughput_ratio, None);
        assert!(s.table().contains("fanout"));
        assert!(s.markdown().starts_with("| workload |"));
    }

    #[test]
    fn cpu_per_message_median_and_ratio() {
        let cpu = |label: &str, broker: &str, us: Option<f64>| Report {
            broker_cpu_us_per_msg: us,
            ..report(label, broker, 10.0, 1.0)
        };
        let rs = vec![
            cpu("qos1", "tributary", Some(10.0)),
            cpu("qos1", "mosquitto", Some(30.0)),
            cpu("qos1", "tributary", Some(14.0)),
            cpu("qos1", "mosquitto", Some(50.0)),
            // A round without the reading does not count towards the median.
            cpu("qos1", "mosquitto", None),
            cpu("amqp", "tributary", None),
            cpu("amqp", "rabbitmq", Some(20.0)),
        ];
        let s = Summary::new(&rs, "tributary");
        let (t, m) = (&s.rows[0], &s.rows[1]);
        assert_eq!((t.broker_cpu_us_per_msg, t.cpu_ratio), (Some(12.0), None));
        assert_eq!(m.broker_cpu_us_per_msg, Some(40.0));
        // mosquitto uses 40 µs per message, tributary 12: 3.33, above 1 = tributary uses less.
        assert_eq!(m.cpu_ratio, Some(40.0 / 12.0));
        // No ratio without the subject's reading.
        assert_eq!(s.rows[3].broker, "rabbitmq");
        assert_eq!(s.rows[3].cpu_ratio, None);

        let table = s.table();
        let header = table.lines().next().unwrap();
        assert!(header.ends_with("it / tributary (CPU)"), "{header}");
        let mosquitto = table.lines().nth(2).unwrap();
        assert!(
            mosquitto.contains(" 40.0 ") && mosquitto.ends_with(" 3.33"),
            "{mosquitto}"
        );
        // Every line of the markdown table has the same number of cells as the header.
        let md = s.markdown();
        let counts: Vec<usize> = md.lines().map(|l| l.matches('|').count()).collect();
        assert!(counts.iter().all(|&c| c == COLUMNS + 1), "{md}");
        assert!(md.contains("| cpu µs/msg |") && md.contains("| it / tributary (CPU) |"));
    }

    #[test]
    fn parses_lines_and_names_the_bad_one() {
        let line = serde_json::to_string(&report("a", "b", 1.0, 1.0)).unwrap();
        let text = format!("{line}\n\n{line}\n");
        assert_eq!(parse_lines(&text).unwrap().len(), 2);
        let err = parse_lines(&format!("{line}\nnot json\n")).unwrap_err();
        assert!(err.to_string().starts_with("line 2:"), "{err}");
    }

    #[test]
    fn draws_an_svg() {
        let rs = vec![
            report("qos0", "tributary", 30.0, 1.0),
            report("qos0", "mosquitto", 20.0, 2.0),
        ];
        let dir = std::env::temp_dir().join(format!("tributary-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chart.svg");
        Summary::new(&rs, "tributary").chart(&path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.contains("mosquitto") && svg.contains("qos0"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
