//! Aligned text tables for people (`--json` is for scripts).

/// A header row and data rows, printed with each column as wide as its widest cell.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// A data row. Cells hold what clients sent (record values, client ids): control
    /// characters are shown escaped, so a record cannot drive the operator's terminal.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows
            .push(cells.into_iter().map(|c| printable(&c)).collect());
    }

    /// One line of text (for commands that report a single outcome).
    pub fn line(text: impl Into<String>) -> Self {
        Self {
            header: Vec::new(),
            rows: vec![vec![text.into()]],
        }
    }

    /// Text printed as it is (for commands whose output is a file format).
    pub fn text(text: String) -> Self {
        Self {
            header: Vec::new(),
            rows: vec![vec![text.trim_end_matches('\n').to_string()]],
        }
    }

    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.header.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in std::iter::once(&self.header).chain(&self.rows) {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header = (!self.header.is_empty()).then_some(&self.header);
        for row in header.into_iter().chain(&self.rows) {
            let last = row.len().saturating_sub(1);
            for (i, cell) in row.iter().enumerate() {
                out.push_str(cell);
                if i < last {
                    let pad = widths[i] - cell.chars().count() + 2;
                    out.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push('\n');
        }
        out
    }
}

/// `text` with control characters as `\u{..}` escapes.
fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_the_widest_cell() {
        let mut t = Table::new(&["NAME", "N"]);
        t.row(vec!["a-long-name".into(), "1".into()]);
        t.row(vec!["b".into(), "22".into()]);
        assert_eq!(
            t.render(),
            "NAME         N\na-long-name  1\nb            22\n"
        );
        assert_eq!(Table::line("done").render(), "done\n");
        let mut t = Table::new(&["V"]);
        t.row(vec!["a\u{1b}[2Jb".into()]);
        assert_eq!(t.render(), "V\na\\u{1b}[2Jb\n");
    }
}
