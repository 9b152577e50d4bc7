//! Looking at a connection's first bytes without taking them
//! (`MSG_PEEK`): TLS or not (permissive inbound), and the first request's
//! authority, an HTTP/1.1 `Host` or an h2c `:authority` (outbound, to
//! choose among destinations that share an address).

use std::time::Duration;

use tokio::net::TcpStream;

/// What a connection's first byte says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FirstBytes {
    /// A TLS handshake record (`0x16`): a ClientHello.
    Tls,
    /// Anything else: plaintext.
    Plaintext,
    /// Nothing within the detection timeout: a server-first protocol, or a
    /// slow client.
    Timeout,
    /// The peer closed (or reset) before sending anything.
    Closed,
}

/// Waits up to `timeout` for the first byte and says what it is.
pub(crate) async fn first_bytes(tcp: &TcpStream, timeout: Duration) -> FirstBytes {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(timeout, tcp.peek(&mut byte)).await {
        Err(_) => FirstBytes::Timeout,
        Ok(Ok(0) | Err(_)) => FirstBytes::Closed,
        Ok(Ok(_)) if byte[0] == 0x16 => FirstBytes::Tls,
        Ok(Ok(_)) => FirstBytes::Plaintext,
    }
}

/// The most of a connection's first bytes read to find its authority: an
/// HTTP/1.1 head, or h2c's preface, SETTINGS and first HEADERS frame (at
/// most 16 KiB without an ACKed larger SETTINGS_MAX_FRAME_SIZE).
const MAX_PEEK: usize = 32 * 1024;

/// The h2c prior-knowledge preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection's first bytes say about its first request's authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Authority {
    /// The HTTP/1.1 `Host`, or the h2c `:authority` (else `host`).
    Found(String),
    /// There is none to find: not HTTP, a complete head without one, or
    /// bytes h2 refuses.
    Absent,
    /// The request has not fully arrived yet.
    Incomplete,
}

/// The authority of the first request at the start of `tcp`, read without
/// taking any byte (`MSG_PEEK`), waiting up to `timeout` for the request
/// head to arrive: an HTTP/1.1 request's `Host`, or an h2c
/// (prior-knowledge) connection's first HEADERS `:authority`, decoded by h2
/// ([`h2_authority`]). `None` when there is none, or nothing complete
/// within `timeout`.
pub(crate) async fn request_authority(tcp: &TcpStream, timeout: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_PEEK];
    let mut seen = 0;
    let mut pause = Duration::from_millis(1);
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if n > seen {
            match authority(&buf[..n]) {
                Authority::Found(a) => return Some(a),
                Authority::Absent => return None,
                Authority::Incomplete if n == buf.len() => return None,
                Authority::Incomplete => {}
            }
            seen = n;
            pause = Duration::from_millis(1);
        }
        // A peek returns at once with what is queued: wait a little for the
        // rest (an h2c client's HEADERS may follow its SETTINGS in a later
        // segment), backing off so that a stalled client costs few wakeups.
        if tokio::time::Instant::now() + pause >= deadline {
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The authority of the first request in `bytes` (see [`Authority`]).
pub(crate) fn authority(bytes: &[u8]) -> Authority {
    if bytes.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(bytes) {
        return Authority::Incomplete;
    }
    if bytes.starts_with(H2_PREFACE) {
        return h2_authority(bytes);
    }
    if let Some(host) = host_header(bytes) {
        return Authority::Found(host);
    }
    let head_ended = bytes.windows(4).any(|w| w == b"\r\n\r\n");
    let line_ended = bytes.windows(2).any(|w| w == b"\r\n");
    let http1 = bytes
        .split(|&b| b == b'\r')
        .next()
        .is_some_and(|line| line.windows(7).any(|w| w == b" HTTP/1"));
    let looks_like_a_method = bytes
        .iter()
        .take_while(|&&b| b != b' ')
        .all(u8::is_ascii_uppercase);
    if head_ended || (line_ended && !http1) || !looks_like_a_method {
        Authority::Absent
    } else {
        Authority::Incomplete
    }
}

/// The first request's `:authority` (else its `host` field) in an h2c
/// connection's first bytes, `bytes` (which start with the preface).
///
/// h2 keeps its HPACK decoder private, so its server is the decoder: a
/// throwaway server connection reads `bytes` from memory (what it would
/// write is dropped) until it yields the first request, or wants more.
/// The bytes are then decoded exactly as the hyper server behind the
/// chosen path will decode them, Huffman coding, dynamic table and
/// CONTINUATION frames included, at the cost of one small connection
/// state, made only when several `[[destination]]`s match one address.
pub(crate) fn h2_authority(bytes: &[u8]) -> Authority {
    let io = Replay {
        data: bytes.to_vec(),
        pos: 0,
    };
    let mut builder = h2::server::Builder::new();
    builder.max_header_list_size(MAX_PEEK as u32);
    let conn = match poll_now(builder.handshake::<_, bytes::Bytes>(io)) {
        None => return Authority::Incomplete,
        Some(Err(_)) => return Authority::Absent,
        Some(Ok(conn)) => conn,
    };
    let mut conn = conn;
    match poll_now(conn.accept()) {
        None => Authority::Incomplete,
        Some(Some(Ok((request, _respond)))) => {
            let from_host = || {
                request
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            };
            match request
                .uri()
                .authority()
                .map(std::string::ToString::to_string)
                .or_else(from_host)
            {
                Some(a) => Authority::Found(a),
                None => Authority::Absent,
            }
        }
        Some(_) => Authority::Absent,
    }
}

/// Polls `fut` a few times without a real waker: the in-memory [`Replay`]
/// never waits on anything, so `Pending` means it has run out of bytes.
fn poll_now<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    // h2 may return Pending once after waking itself to yield; a few more
    // polls tell that from running out of input.
    for _ in 0..4 {
        if let std::task::Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Some(out);
        }
    }
    None
}

/// Peeked bytes, read once; writes are dropped; past the end, `Pending`
/// (not end of stream, which h2 would take for a closed connection).
struct Replay {
    data: Vec<u8>,
    pos: usize,
}

impl tokio::io::AsyncRead for Replay {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let rest = &self.data[self.pos..];
        if rest.is_empty() {
            return std::task::Poll::Pending;
        }
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.pos += n;
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Replay {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The `Host` field of a request head (or of its first part).
pub(crate) fn host_header(head: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(head).ok().or_else(|| {
        // A head cut inside a UTF-8 sequence: the valid prefix.
        let valid = std::str::from_utf8(head).err()?.valid_up_to();
        std::str::from_utf8(&head[..valid]).ok()
    })?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next()?;
    if request_line.starts_with("PRI * HTTP/2.0") || !request_line.contains(" HTTP/1.") {
        return None;
    }
    for line in lines {
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        if name.eq_ignore_ascii_case("host") {
            return Some(value.trim().to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_of_an_http1_head_is_read_and_h2c_has_none() {
        let head = b"GET /x HTTP/1.1\r\nUser-Agent: t\r\nhost: billing.shop:8080\r\n\r\n";
        assert_eq!(host_header(head).as_deref(), Some("billing.shop:8080"));
        assert_eq!(host_header(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n"), None);
        assert_eq!(host_header(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), None);
        assert_eq!(host_header(b"\x16\x03\x01\x02\x00"), None);
        // Cut short: what is there counts.
        assert_eq!(
            host_header(b"GET / HTTP/1.1\r\nHost: a.shop\r\nAcc").as_deref(),
            Some("a.shop")
        );
    }

    #[test]
    fn an_incomplete_head_waits_and_what_is_not_http_has_no_authority() {
        use Authority::*;
        assert_eq!(authority(b"GET / HTTP/1.1\r\nAcc"), Incomplete);
        assert_eq!(authority(b"GE"), Incomplete);
        assert_eq!(authority(b"PRI * HTTP/2"), Incomplete);
        assert_eq!(authority(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n"), Absent);
        assert_eq!(authority(b"\x16\x03\x01\x02\x00"), Absent);
        assert_eq!(authority(b"SSH-2.0-OpenSSH\r\n"), Absent);
        assert_eq!(
            authority(b"GET / HTTP/1.1\r\nHost: a.shop\r\n"),
            Found("a.shop".into())
        );
        // The preface and nothing more: the HEADERS frame is still to come.
        assert_eq!(authority(H2_PREFACE), Incomplete);
        // Not HTTP/2 after all.
        let mut junk = H2_PREFACE.to_vec();
        junk.extend_from_slice(&[0xff; 64]);
        assert_eq!(authority(&junk), Absent);
    }

    #[tokio::test]
    async fn an_h2c_connection_s_authority_is_read_without_taking_its_bytes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A real h2 client (HPACK with Huffman coding), its HEADERS sent
        // after a pause: a later segment than its preface and SETTINGS.
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let (send, conn) = h2::client::handshake(tcp).await.unwrap();
            tokio::spawn(conn);
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut send = send.ready().await.unwrap();
            let request = http::Request::get("http://billing.shop:8080/api/x")
                .header("user-agent", "test")
                .body(())
                .unwrap();
            let _response = send.send_request(request, true).unwrap();
            std::future::pending::<()>().await;
        });
        let (s, _) = listener.accept().await.unwrap();
        let found = request_authority(&s, Duration::from_secs(10)).await;
        assert_eq!(found.as_deref(), Some("billing.shop:8080"));
        // Nothing was taken: the chosen path reads the preface again.
        let mut buf = [0u8; 24];
        s.peek(&mut buf).await.unwrap();
        assert_eq!(&buf[..], H2_PREFACE);
        client.abort();

        // A client that sends its preface and then nothing: no authority,
        // after the timeout.
        let mut c = TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut c, H2_PREFACE)
            .await
            .unwrap();
        let (s, _) = listener.accept().await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(
            request_authority(&s, Duration::from_millis(300)).await,
            None
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn the_first_byte_says_tls_plaintext_timeout_or_closed() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let short = Duration::from_millis(200);
        for (send, want) in [
            (&b"\x16\x03\x01"[..], FirstBytes::Tls),
            (&b"GET / HTTP/1.1\r\n"[..], FirstBytes::Plaintext),
        ] {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(send).await.unwrap();
            let (s, _) = listener.accept().await.unwrap();
            assert_eq!(first_bytes(&s, Duration::from_secs(10)).await, want);
            // Peeking took nothing.
            let mut buf = [0u8; 3];
            s.peek(&mut buf).await.unwrap();
            assert_eq!(buf[..], send[..3]);
        }
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (s, _) = listener.accept().await.unwrap();
        assert_eq!(first_bytes(&s, short).await, FirstBytes::Timeout);
        drop(TcpStream::connect(addr).await.unwrap());
        let (s, _) = listener.accept().await.unwrap();
        assert_eq!(
            first_bytes(&s, Duration::from_secs(10)).await,
            FirstBytes::Closed
        );
    }
}
