//! Just enough HTTP/1.1 to serve one request per connection: a bounded request head, a
//! `Content-Length` body with a size cap, and plain responses. Anything else is refused
//! with a 4xx rather than guessed at.

use std::io::{self, Read, Write};

/// Largest request head (request line + headers) accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body accepted.
pub const MAX_BODY: usize = 4 * 1024;

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// A request that cannot be served, with the status to answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

/// Reading the request failed: either answer with a status, or the client went away
/// (nothing to answer).
#[derive(Debug)]
pub enum ReadError {
    Refuse(Refusal),
    Io(io::Error),
}

fn refuse(status: u16, message: impl Into<String>) -> ReadError {
    ReadError::Refuse(Refusal {
        status,
        message: message.into(),
    })
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Reads one request from `stream`.
pub fn read_request<S: Read + Write>(stream: &mut S) -> Result<Request, ReadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Err(refuse(431, "request head too large"));
        }
        let n = stream.read(&mut chunk).map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if head_end > MAX_HEAD {
        return Err(refuse(431, "request head too large"));
    }
    let head = std::str::from_utf8(&buf[..head_end - 4])
        .map_err(|_| refuse(400, "request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse(400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(refuse(505, "only HTTP/1.x is supported"));
    }
    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(refuse(400, "malformed header line"));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                let len: usize = value
                    .parse()
                    .map_err(|_| refuse(400, "invalid Content-Length"))?;
                if content_length.is_some_and(|l| l != len) {
                    return Err(refuse(400, "conflicting Content-Length headers"));
                }
                content_length = Some(len);
            }
            "transfer-encoding" => {
                return Err(refuse(
                    411,
                    "chunked bodies are not supported: send Content-Length",
                ));
            }
            "expect" if value.eq_ignore_ascii_case("100-continue") => expect_continue = true,
            _ => {}
        }
    }
    let len = content_length.unwrap_or(0);
    if len > MAX_BODY {
        return Err(refuse(
            413,
            format!("body of {len} bytes exceeds the {MAX_BODY}-byte limit"),
        ));
    }
    if expect_continue && len > 0 {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(ReadError::Io)?;
    }
    let mut body = buf[head_end..].to_vec();
    if body.len() > len {
        return Err(refuse(400, "more body bytes than Content-Length"));
    }
    while body.len() < len {
        let n = stream.read(&mut chunk).map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        body.extend_from_slice(&chunk[..n]);
        if body.len() > len {
            return Err(refuse(400, "more body bytes than Content-Length"));
        }
    }
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        body,
    })
}

/// The reason phrase of the statuses this server uses.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// The content type of every answer but `GET /metrics`.
pub const JSON: &str = "application/json";

/// Writes a complete response with a body of `content_type` and closes the exchange;
/// `allow` lists the methods of the path for a 405.
pub fn write_response<W: Write>(
    w: &mut W,
    status: u16,
    content_type: &str,
    allow: &str,
    json: &str,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reason(status),
        json.len() + 1
    );
    if status == 405 && !allow.is_empty() {
        out.push_str(&format!("Allow: {allow}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(json);
    out.push('\n');
    w.write_all(out.as_bytes())?;
    w.flush()
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A stream that reads from a script and records what is written.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn parse(raw: &[u8]) -> Result<Request, ReadError> {
        read_request(&mut Duplex {
            input: Cursor::new(raw.to_vec()),
            output: Vec::new(),
        })
    }

    fn status_of(raw: &[u8]) -> u16 {
        match parse(raw) {
            Err(ReadError::Refuse(r)) => r.status,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_put_with_body() {
        let r =
            parse(b"PUT /v1/memory HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello").unwrap();
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/v1/memory");
        assert_eq!(r.body, b"hello");
    }

    #[test]
    fn answers_expect_continue() {
        let mut d = Duplex {
            input: Cursor::new(
                b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            ),
            output: Vec::new(),
        };
        assert_eq!(read_request(&mut d).unwrap().body, b"ok");
        assert!(d.output.starts_with(b"HTTP/1.1 100 Continue"));
    }

    #[test]
    fn refuses_what_it_does_not_speak() {
        assert_eq!(status_of(b"GARBAGE\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET / HTTP/2\r\n\r\n"), 505);
        assert_eq!(status_of(b"GET / HTTP/1.1\r\nno colon\r\n\r\n"), 400);
        assert_eq!(
            status_of(b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            400
        );
        assert_eq!(
            status_of(b"PUT / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n"),
            413
        );
        assert_eq!(
            status_of(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(
            status_of(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status_of(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\n\r\nxx"),
            400
        );
        let mut big = b"GET / HTTP/1.1\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        assert_eq!(status_of(&big), 431);
    }

    #[test]
    fn a_vanished_client_is_an_io_error() {
        assert!(matches!(parse(b"GET / HT"), Err(ReadError::Io(_))));
        assert!(matches!(
            parse(b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"),
            Err(ReadError::Io(_))
        ));
    }

    #[test]
    fn response_has_length_and_close() {
        let mut out = Vec::new();
        write_response(&mut out, 404, JSON, "", "{\"error\":\"x\"}").unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("Content-Length: 14\r\n"));
        assert!(text.contains("Connection: close\r\n"));
    }
}
