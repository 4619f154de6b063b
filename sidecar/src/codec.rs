//! Framing of both fold protocols: each message is an unsigned-varint length followed by that many
//! bytes of protobuf, with a per-protocol size limit checked before any allocation. Oversized,
//! truncated and malformed messages are I/O errors that say which. `/fold/schema/1.0.0` uses it
//! as a request-response codec (one message each way per stream); `/fold/forward/2.0.0` as a
//! sequence of frames on a long-lived stream ([`read_frame`], [`encode_frame`]).

use std::io;
use std::marker::PhantomData;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use prost::Message;

pub const SCHEMA_PROTOCOL: StreamProtocol = StreamProtocol::new("/fold/schema/1.0.0");
/// Forwarded requests: one long-lived stream per peer carrying many tagged requests.
pub const FORWARD_PROTOCOL: StreamProtocol = StreamProtocol::new("/fold/forward/2.0.0");

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
/// `None` when the stream ends cleanly between messages.
pub async fn read_frame<M: Message + Default, T: AsyncRead + Unpin>(
    io: &mut T,
    max: usize,
) -> io::Result<Option<M>> {
    let mut len: u64 = 0;
    let mut shift = 0;
    loop {
        let mut b = [0u8; 1];
        match io.read_exact(&mut b).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && shift == 0 => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated message: the stream ended inside the length prefix",
                ));
            }
            Err(e) => return Err(e),
        }
        len |= u64::from(b[0] & 0x7f) << shift;
        if b[0] & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 63 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed length prefix (varint longer than 10 bytes)",
            ));
        }
    }
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes is over this protocol's limit of {max} bytes"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("truncated message: expected {len} bytes"),
            )
        } else {
            e
        }
    })?;
    M::decode(buf.as_slice()).map(Some).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed protobuf message: {e}"),
        )
    })
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

    fn block<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
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
}
