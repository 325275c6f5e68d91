//! Reading protocol lines from a socket with a hard length limit.
//!
//! A line longer than the limit is not buffered: its bytes are skipped up to the next newline
//! and reported as [`Line::TooLong`], so one bad line costs its sender an error, not the
//! reader's memory, and the stream stays in sync.

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// One framed line.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// The line without its `\n` (and without a `\r` before it).
    Text(Vec<u8>),
    /// A line over the limit; its bytes were discarded.
    TooLong,
}

pub struct LineReader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
    max: usize,
    discarding: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// Lines of at most `max` bytes, terminator included.
    pub fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner: BufReader::with_capacity(16 * 1024, inner),
            buf: Vec::new(),
            max,
            discarding: false,
        }
    }

    /// The next line, or `None` at end of stream (a partial last line is dropped).
    /// Cancel-safe: bytes consumed so far stay in the reader's own buffer.
    pub async fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        loop {
            let avail = self.inner.fill_buf().await?;
            if avail.is_empty() {
                return Ok(None);
            }
            match avail.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    let too_long = self.discarding || self.buf.len() + pos + 1 > self.max;
                    let line = if too_long {
                        Line::TooLong
                    } else {
                        self.buf.extend_from_slice(&avail[..pos]);
                        if self.buf.last() == Some(&b'\r') {
                            self.buf.pop();
                        }
                        Line::Text(std::mem::take(&mut self.buf))
                    };
                    self.buf.clear();
                    self.discarding = false;
                    self.inner.consume(pos + 1);
                    return Ok(Some(line));
                }
                None => {
                    let n = avail.len();
                    if !self.discarding {
                        if self.buf.len() + n >= self.max {
                            self.discarding = true;
                            self.buf = Vec::new();
                        } else {
                            self.buf.extend_from_slice(avail);
                        }
                    }
                    self.inner.consume(n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], max: usize) -> Vec<Line> {
        let mut r = LineReader::new(input, max);
        let mut out = Vec::new();
        while let Some(l) = r.next_line().await.unwrap() {
            out.push(l);
        }
        out
    }

    #[tokio::test]
    async fn frames_lines_and_skips_long_ones() {
        let long = vec![b'x'; 100];
        let mut input = b"PING\r\nA B\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\nAFTER\npartial");
        let got = lines(&input, 20).await;
        assert_eq!(
            got,
            vec![
                Line::Text(b"PING".to_vec()),
                Line::Text(b"A B".to_vec()),
                Line::TooLong,
                Line::Text(b"AFTER".to_vec()),
            ]
        );
        // Exactly at the limit (terminator included) passes; one more byte does not.
        assert_eq!(
            lines(b"abcd\n", 5).await,
            vec![Line::Text(b"abcd".to_vec())]
        );
        assert_eq!(lines(b"abcde\n", 5).await, vec![Line::TooLong]);
    }
}
