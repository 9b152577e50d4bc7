//! Looking at a connection's first bytes without taking them
//! (`MSG_PEEK`): TLS or not (permissive inbound), and an HTTP/1.1
//! request's `Host` (outbound, to choose among destinations).

use std::time::Duration;

use tokio::net::TcpStream;

/// What a connection's first byte says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstBytes {
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
pub async fn first_bytes(tcp: &TcpStream, timeout: Duration) -> FirstBytes {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(timeout, tcp.peek(&mut byte)).await {
        Err(_) => FirstBytes::Timeout,
        Ok(Ok(0)) | Ok(Err(_)) => FirstBytes::Closed,
        Ok(Ok(_)) if byte[0] == 0x16 => FirstBytes::Tls,
        Ok(Ok(_)) => FirstBytes::Plaintext,
    }
}

/// The `Host` of the HTTP/1.1 request head at the start of `tcp`, if the
/// first bytes to arrive (within `timeout`) hold it. HTTP/2's
/// `:authority` is HPACK-coded and is not read: an h2c connection gets
/// `None`.
pub async fn http1_host(tcp: &TcpStream, timeout: Duration) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // XXX: one peek: what the first segment(s) carry. A request head split
    // across later segments gives no Host, and the first entry is used.
    let n = tokio::time::timeout(timeout, tcp.peek(&mut buf))
        .await
        .ok()?
        .ok()?;
    host_header(&buf[..n])
}

/// The `Host` field of a request head (or of its first part).
pub fn host_header(head: &[u8]) -> Option<String> {
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
