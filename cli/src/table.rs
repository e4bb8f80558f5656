//! A tiny table formatter for human output: left-aligned columns, two spaces apart, widths
//! counted in characters, no trailing spaces.

/// Rows of text under a header.
#[derive(Debug)]
pub(crate) struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub(crate) fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| (*h).to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, extra cells are dropped.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    /// The table as text, one line per row after the header, each line ending in `\n`.
    pub(crate) fn render(&self) -> String {
        let width = |cell: &String| cell.chars().count();
        let mut widths: Vec<usize> = self.headers.iter().map(width).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', w - width(cell)));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `text` made safe to print on a terminal: control characters that could move the cursor,
/// change colours or retitle the window (escape sequences a command printed) are shown in
/// caret notation (`^[`, `^?`) or as `\u{9b}`; newlines and tabs stay.
pub(crate) fn terminal_safe(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            '\u{7f}' => out.push_str("^?"),
            c if (c as u32) < 0x20 => {
                out.push('^');
                out.push(char::from_u32(c as u32 + 0x40).unwrap_or('?'));
            }
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    out
}

/// `text` cut to at most `max` characters, ending in `…` if it was cut; newlines become spaces.
pub(crate) fn clip(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_lines_have_no_trailing_space() {
        let mut t = Table::new(&["NAME", "STATE", "NOTE"]);
        t.row(vec!["a".into(), "scheduled".into(), "".into()]);
        t.row(vec!["longer-name".into(), "ok".into(), "x".into()]);
        assert_eq!(
            t.render(),
            "NAME         STATE      NOTE\n\
             a            scheduled\n\
             longer-name  ok         x\n"
        );
    }

    #[test]
    fn widths_count_characters_not_bytes() {
        let mut t = Table::new(&["A", "B"]);
        t.row(vec!["héé".into(), "1".into()]);
        t.row(vec!["abcd".into(), "2".into()]);
        assert_eq!(t.render(), "A     B\nhéé   1\nabcd  2\n");
    }

    #[test]
    fn short_rows_are_padded_and_empty_tables_have_a_header() {
        let mut t = Table::new(&["A", "B"]);
        assert_eq!(t.render(), "A  B\n");
        t.row(vec!["x".into()]);
        assert_eq!(t.render(), "A  B\nx\n");
    }

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(
            terminal_safe("ok\u{1b}[2J\u{1b}]0;pwned\u{7}\u{9b}x\tend\nnext"),
            "ok^[[2J^[]0;pwned^G\\u{9b}x\tend\nnext"
        );
        assert_eq!(terminal_safe("plain"), "plain");
    }

    #[test]
    fn clip_cuts_on_characters() {
        assert_eq!(clip("hello", 10), "hello");
        assert_eq!(clip("hello world", 6), "hello…");
        assert_eq!(clip("a\nb", 5), "a b");
    }
}
