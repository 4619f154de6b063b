//! Framing of both fold protocols: each message is an unsigned-varint length followed by that many
//! bytes of protobuf, with a per-protocol size limit checked before any allocation. The body is
//! buffered as its bytes arrive (never allocated up front on the length a peer declares), and a
//! frame whose bytes stop coming times out ([`FRAME_TIMEOUT`]). Oversized, truncated, stalled
//! and malformed messages are I/O errors that say which. `/fold/schema/1.0.0` uses it
//! as a request-response codec (one message each way per stream); `/fold/forward/2.0.0` as a
//! sequence of frames on a long-lived stream ([`read_frame`], [`encode_frame`]).

use std::io;
use std::marker::PhantomData;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use prost::Message;

pub const SCHEMA_PROTOCOL: StreamProtocol = StreamProtocol::new("/fold/schema/1.0.0");
/// Forwarded requests: one long-lived stream per peer carrying many tagged requests.
pub const FORWARD_PROTOCOL: StreamProtocol = StreamProtocol::new("/fold/forward/2.0.0");

/// How long the rest of a frame may take once its first byte has arrived (an idle long-lived
/// stream between frames has no limit). At 4 MiB, a peer must send at least ~140 KiB/s.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// The most a frame's buffer grows ahead of the bytes received.
const READ_CHUNK: usize = 64 * 1024;

/// Read one length-delimited protobuf message of at most `max` bytes.
pub async fn read_message<M: Message + Default, T: AsyncRead + Unpin>(
    io: &mut T,
    max: usize,
) -> io::Result<M> {
    match read_frame(io, max).await? {
        Some(m) => Ok(m),
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "truncated message: the stream ended inside the length prefix",
        )),
    }
}

/// Read the next length-delimited message of at most `max` bytes from a long-lived stream;
/// `None` when the stream ends cleanly between messages. Once a frame has begun, the rest of it
/// must arrive within [`FRAME_TIMEOUT`].
pub async fn read_frame<M: Message + Default, T: AsyncRead + Unpin>(
    io: &mut T,
    max: usize,
) -> io::Result<Option<M>> {
    read_frame_within(io, max, FRAME_TIMEOUT).await
}

/// [`read_frame`] with the time a begun frame may take to arrive in full (no limit outside a
/// tokio runtime).
pub async fn read_frame_within<M: Message + Default, T: AsyncRead + Unpin>(
    io: &mut T,
    max: usize,
    timeout: Duration,
) -> io::Result<Option<M>> {
    // Wait as long as it takes for a frame to begin...
    let mut first = [0u8; 1];
    match io.read_exact(&mut first).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    // ...then bounded for the rest of it.
    let rest = read_rest(io, first[0], max);
    let buf = if tokio::runtime::Handle::try_current().is_ok() {
        match tokio::time::timeout(timeout, rest).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "stalled message: not received in full within {} ms of its first byte",
                        timeout.as_millis()
                    ),
                ));
            }
        }
    } else {
        rest.await?
    };
    M::decode(buf.as_slice()).map(Some).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed protobuf message: {e}"),
        )
    })
}

/// The rest of a frame whose first byte is `first`: the length prefix, then the body, buffered
/// as it arrives.
async fn read_rest<T: AsyncRead + Unpin>(io: &mut T, first: u8, max: usize) -> io::Result<Vec<u8>> {
    let mut b = first;
    let mut len: u64 = 0;
    let mut shift = 0;
    loop {
        len |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 63 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed length prefix (varint longer than 10 bytes)",
            ));
        }
        let mut next = [0u8; 1];
        io.read_exact(&mut next).await.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated message: the stream ended inside the length prefix",
                )
            } else {
                e
            }
        })?;
        b = next[0];
    }
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes is over this protocol's limit of {max} bytes"),
        ));
    }
    // Grow with the bytes received, never ahead of them by more than one chunk.
    let mut buf = Vec::with_capacity(len.min(READ_CHUNK));
    while buf.len() < len {
        let have = buf.len();
        let want = (len - have).min(READ_CHUNK);
        buf.resize(have + want, 0);
        let n = io.read(&mut buf[have..]).await?;
        buf.truncate(have + n);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("truncated message: expected {len} bytes, the stream ended after {have}"),
            ));
        }
    }
    Ok(buf)
}

/// Append `msg`, length-delimited, to `buf` (refusing more than `max` bytes), for a writer that
/// sends several frames in one write.
pub fn encode_frame<M: Message>(msg: &M, max: usize, buf: &mut Vec<u8>) -> io::Result<()> {
    let len = msg.encoded_len();
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("message of {len} bytes is over this protocol's limit of {max} bytes"),
        ));
    }
    msg.encode_length_delimited(buf)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

/// Write one length-delimited protobuf message (refusing to send more than `max` bytes).
pub async fn write_message<M: Message, T: AsyncWrite + Unpin>(
    io: &mut T,
    msg: &M,
    max: usize,
) -> io::Result<()> {
    let len = msg.encoded_len();
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("message of {len} bytes is over this protocol's limit of {max} bytes"),
        ));
    }
    let mut buf = Vec::with_capacity(len + 10);
    msg.encode_length_delimited(&mut buf)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    io.write_all(&buf).await?;
    io.flush().await?;
    io.close().await
}

/// A prost codec for one request/response pair.
pub struct ProstCodec<Req, Resp> {
    max_bytes: usize,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> ProstCodec<Req, Resp> {
    pub fn new(max_bytes: usize) -> Self {
        ProstCodec {
            max_bytes,
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> Clone for ProstCodec<Req, Resp> {
    fn clone(&self) -> Self {
        ProstCodec::new(self.max_bytes)
    }
}

impl<Req, Resp> libp2p::request_response::Codec for ProstCodec<Req, Resp>
where
    Req: Message + Default + Send + 'static,
    Resp: Message + Default + Send + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io, self.max_bytes).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io, self.max_bytes).await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &req, self.max_bytes).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &res, self.max_bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fold_proto::wire::CheckSchemasRequest;
    use futures::io::Cursor;
    use proptest::prelude::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    fn block<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    /// Hands out its bytes in the given chunk sizes, then ends (or, with `hang`, never says
    /// more). Records the largest read buffer it was offered.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        sizes: Vec<usize>,
        hang: bool,
        largest_read: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            self.largest_read = self.largest_read.max(buf.len());
            if self.pos >= self.data.len() {
                return if self.hang {
                    Poll::Pending
                } else {
                    Poll::Ready(Ok(0))
                };
            }
            let step = if self.sizes.is_empty() {
                usize::MAX
            } else {
                self.sizes.remove(0).max(1)
            };
            let n = step.min(buf.len()).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Poll::Ready(Ok(n))
        }
    }

    fn chunked(data: Vec<u8>, sizes: Vec<usize>, hang: bool) -> Chunked {
        Chunked {
            data,
            pos: 0,
            sizes,
            hang,
            largest_read: 0,
        }
    }

    #[test]
    fn roundtrip_and_limits() {
        let msg = CheckSchemasRequest {
            names: vec!["Notes".into(), "Profile".into()],
        };
        let mut out = Cursor::new(Vec::new());
        block(write_message(&mut out, &msg, 1024)).unwrap();
        let bytes = out.into_inner();
        let back: CheckSchemasRequest =
            block(read_message(&mut Cursor::new(bytes.clone()), 1024)).unwrap();
        assert_eq!(back, msg);

        // Over the limit: refused before reading the body.
        let e = block(read_message::<CheckSchemasRequest, _>(
            &mut Cursor::new(bytes.clone()),
            4,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("over this protocol's limit"), "{e}");
        let mut out = Cursor::new(Vec::new());
        assert!(block(write_message(&mut out, &msg, 4)).is_err());

        // Truncated body and truncated prefix.
        let e = block(read_message::<CheckSchemasRequest, _>(
            &mut Cursor::new(bytes[..bytes.len() - 3].to_vec()),
            1024,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = block(read_message::<CheckSchemasRequest, _>(
            &mut Cursor::new(vec![0x80]),
            1024,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");

        // Garbage body.
        let e = block(read_message::<CheckSchemasRequest, _>(
            &mut Cursor::new(vec![3, 0xff, 0xff, 0xff]),
            1024,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("malformed"), "{e}");
        // Endless varint.
        let e = block(read_message::<CheckSchemasRequest, _>(
            &mut Cursor::new(vec![0xff; 12]),
            1024,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("malformed length"), "{e}");
    }

    /// A frame that declares 4 MiB and sends 10 bytes is never given a 4 MiB buffer, and times
    /// out; an idle stream between frames does not.
    #[tokio::test]
    async fn a_stalled_frame_times_out_without_its_declared_buffer() {
        let mut data = Vec::new();
        prost::encoding::encode_varint(4 << 20, &mut data);
        data.extend_from_slice(&[0u8; 10]);
        let mut r = chunked(data, Vec::new(), true);
        let e = read_frame_within::<CheckSchemasRequest, _>(
            &mut r,
            4 << 20,
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("stalled"), "{e}");
        assert!(r.largest_read <= READ_CHUNK, "{}", r.largest_read);

        let mut idle = chunked(Vec::new(), Vec::new(), true);
        let waited = tokio::time::timeout(
            Duration::from_millis(200),
            read_frame_within::<CheckSchemasRequest, _>(&mut idle, 1024, Duration::from_millis(50)),
        )
        .await;
        assert!(waited.is_err(), "an idle stream is not a stalled frame");
    }

    proptest! {
        /// Any sequence of messages, delivered in any chunking, reads back as sent, then a
        /// clean end; no read buffer is ever larger than one chunk.
        #[test]
        fn frames_read_back_in_any_chunking(
            msgs in proptest::collection::vec(
                proptest::collection::vec("[a-zA-Z0-9]{0,300}", 0..5), 0..6),
            sizes in proptest::collection::vec(1usize..400, 0..64),
        ) {
            let msgs: Vec<CheckSchemasRequest> =
                msgs.into_iter().map(|names| CheckSchemasRequest { names }).collect();
            let mut data = Vec::new();
            for m in &msgs {
                encode_frame(m, 1 << 20, &mut data).unwrap();
            }
            let mut r = chunked(data, sizes, false);
            for m in &msgs {
                let got: Option<CheckSchemasRequest> = block(read_frame(&mut r, 1 << 20)).unwrap();
                prop_assert_eq!(got.as_ref(), Some(m));
            }
            let end: Option<CheckSchemasRequest> = block(read_frame(&mut r, 1 << 20)).unwrap();
            prop_assert!(end.is_none());
            prop_assert!(r.largest_read <= READ_CHUNK);
        }

        /// Arbitrary bytes never panic; a declared length over the limit is refused by name, and
        /// whatever is accepted fits the limit.
        #[test]
        fn arbitrary_bytes_are_refused_or_fit(
            data in proptest::collection::vec(any::<u8>(), 0..2048),
            max in 0usize..1024,
        ) {
            let mut r = chunked(data.clone(), Vec::new(), false);
            match block(read_frame::<CheckSchemasRequest, _>(&mut r, max)) {
                Ok(Some(m)) => prop_assert!(m.encoded_len() <= max),
                Ok(None) => prop_assert!(data.is_empty()),
                Err(e) => {
                    let mut len_bytes = data.as_slice();
                    if let Ok(declared) = prost::encoding::decode_varint(&mut len_bytes)
                        && declared > max as u64
                    {
                        prop_assert!(e.to_string().contains("over this protocol's limit"), "{}", e);
                    }
                }
            }
        }
    }
}
