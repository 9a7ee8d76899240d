//! Splitting a gRPC body into its messages, without copying them.
//!
//! Both directions of `Attach` use it: the master reads each child's
//! request body with it, and a child reads the master's response body.
//! A stream arrives as HTTP/2 DATA frames of up to
//! 256 KiB, each holding many gRPC messages (a 5-byte prefix — a
//! compression flag and a big-endian length — then the message). The
//! messages that lie whole inside one DATA frame are handed out as slices
//! of it (a reference count, no copy); only a message cut by a frame
//! boundary is put together in a small buffer. tonic's reader copies every
//! byte into its own buffer first and goes through a stream item per
//! message; on the hottest paths of the master and the SDK this one does
//! neither. A body's trailers end it with their `grpc-status`.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tonic::codegen::{Body as HttpBody, StdError};
use tonic::{Code, Status};

use crate::spin::Spin;

/// Turns one message's bytes into a value.
pub(crate) trait DecodeMessage {
    /// What a message decodes to.
    type Item;
    /// Decodes `message` (the bytes after its prefix).
    fn decode_message(&mut self, message: Bytes) -> Result<Self::Item, Status>;
}

/// A gRPC body's messages, decoded, with the polling window of the task
/// that reads them (`spin.rs`): every message it hands out, however the
/// reader came to wait for it, starts a new window.
pub(crate) struct Messages<B, D> {
    reader: MessageReader<B>,
    decoder: D,
    spin: Spin,
}

impl<B, D> Messages<B, D>
where
    B: HttpBody,
    B::Error: Into<StdError>,
    D: DecodeMessage,
{
    /// Reads `body`; a message longer than `max_message` bytes ends it
    /// with RESOURCE_EXHAUSTED (what it holds is never buffered whole).
    /// `idle_spin` is the reader's polling window after each message.
    pub(crate) fn new(body: B, decoder: D, max_message: usize, idle_spin: Duration) -> Self {
        Messages {
            reader: MessageReader::new(body, max_message),
            decoder,
            spin: Spin::new(idle_spin),
        }
    }

    /// Nothing is here now: whether the reader should yield and look again
    /// instead of sleeping (see [`Spin::keep_polling`]).
    pub(crate) fn keep_polling(&mut self) -> bool {
        self.spin.keep_polling()
    }

    /// The next value; `None` at the end of the body.
    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<D::Item>, Status>> {
        let next = ready!(self.reader.poll_message(cx));
        self.spin.active();
        Poll::Ready(match next {
            Ok(Some(message)) => self.decoder.decode_message(message).map(Some),
            Ok(None) => Ok(None),
            Err(status) => Err(status),
        })
    }

    /// The next value; `None` at the end of the body. Cancel-safe.
    pub(crate) async fn message(&mut self) -> Result<Option<D::Item>, Status> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }
}

/// The prefix before each message: a compression flag, then the length.
pub(crate) const PREFIX: usize = 5;

/// Reads the messages of a gRPC body in order.
pub(crate) struct MessageReader<B> {
    body: Pin<Box<B>>,
    /// What is left of the latest DATA frame: whole messages, then perhaps
    /// the start of one.
    chunk: Bytes,
    /// The start of a message cut by a DATA frame boundary, prefix included.
    partial: BytesMut,
    /// The body has ended.
    ended: bool,
    /// The status its trailers gave, when not OK.
    failed: Option<Status>,
    /// The longest message accepted.
    max_message: usize,
}

impl<B> MessageReader<B>
where
    B: HttpBody,
    B::Error: Into<StdError>,
{
    pub(crate) fn new(body: B, max_message: usize) -> Self {
        MessageReader {
            max_message,
            body: Box::pin(body),
            chunk: Bytes::new(),
            partial: BytesMut::new(),
            ended: false,
            failed: None,
        }
    }

    /// The next message; `None` at the end of the body.
    pub(crate) fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, Status>> {
        loop {
            if let Some(message) = self.split()? {
                return Poll::Ready(Ok(Some(message)));
            }
            if self.ended {
                return Poll::Ready(if self.chunk.is_empty() && self.partial.is_empty() {
                    self.failed.take().map_or(Ok(None), Err)
                } else {
                    Err(Status::invalid_argument(
                        "the stream ended in the middle of a gRPC message",
                    ))
                });
            }
            match ready!(self.body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        let data = data.copy_to_bytes(data.remaining());
                        debug_assert!(self.chunk.is_empty(), "split() consumed the chunk");
                        self.chunk = data;
                    }
                    Err(frame) => {
                        if let Some(status) = frame.trailers_ref().and_then(Status::from_header_map)
                        {
                            if status.code() != Code::Ok {
                                self.failed = Some(status);
                            }
                        }
                    }
                },
                Some(Err(e)) => return Poll::Ready(Err(Status::from_error(e.into()))),
                None => self.ended = true,
            }
        }
    }

    /// The next message wholly received, if any. Leaves `chunk` empty when
    /// it returns `None`.
    fn split(&mut self) -> Result<Option<Bytes>, Status> {
        if !self.partial.is_empty() {
            // Complete the cut message from the new chunk.
            loop {
                let need = wanted(&self.partial, self.max_message)?;
                if self.partial.len() >= need {
                    break;
                }
                if self.chunk.is_empty() {
                    return Ok(None);
                }
                let take = (need - self.partial.len()).min(self.chunk.len());
                self.partial.extend_from_slice(&self.chunk[..take]);
                self.chunk.advance(take);
            }
            let mut message = self.partial.split().freeze();
            message.advance(PREFIX);
            return Ok(Some(message));
        }
        if self.chunk.len() >= PREFIX {
            let need = wanted(&self.chunk, self.max_message)?;
            if self.chunk.len() >= need {
                self.chunk.advance(PREFIX);
                return Ok(Some(self.chunk.split_to(need - PREFIX)));
            }
        }
        if !self.chunk.is_empty() {
            self.partial.extend_from_slice(&self.chunk);
            self.chunk.clear();
        }
        Ok(None)
    }
}

/// How many bytes the message starting at `head` takes, prefix included
/// (just the prefix while it is incomplete).
fn wanted(head: &[u8], max_message: usize) -> Result<usize, Status> {
    if head.len() < PREFIX {
        return Ok(PREFIX);
    }
    if head[0] != 0 {
        return Err(Status::unimplemented(
            "a compressed gRPC message: Clutch takes messages uncompressed (compression flag 0)",
        ));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > max_message {
        return Err(Status::resource_exhausted(format!(
            "a gRPC message of {len} bytes; the limit on this stream is {max_message} bytes"
        )));
    }
    Ok(PREFIX + len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::future::poll_fn;

    use tonic::codegen::http;

    use proptest::prelude::*;

    /// A body that yields the given frames, then ends.
    struct Frames(std::collections::VecDeque<http_body::Frame<Bytes>>);

    impl HttpBody for Frames {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn framed(messages: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in messages {
            out.push(0);
            out.extend_from_slice(&(m.len() as u32).to_be_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    async fn read_all(chunks: Vec<Bytes>) -> Result<Vec<Vec<u8>>, Status> {
        let mut reader = MessageReader::new(
            Frames(chunks.into_iter().map(http_body::Frame::data).collect()),
            usize::MAX,
        );
        let mut out = Vec::new();
        while let Some(m) = poll_fn(|cx| reader.poll_message(cx)).await? {
            out.push(m.to_vec());
        }
        Ok(out)
    }

    proptest! {
        /// However the body is cut into DATA frames, the messages come out
        /// whole, in order, and nothing else.
        #[test]
        fn messages_survive_any_cut(
            messages in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..20),
            cuts in prop::collection::vec(1usize..400, 0..40),
        ) {
            let bytes = framed(&messages);
            let mut chunks = Vec::new();
            let mut at = 0;
            for cut in cuts {
                if at >= bytes.len() { break; }
                let end = (at + cut).min(bytes.len());
                chunks.push(Bytes::copy_from_slice(&bytes[at..end]));
                at = end;
            }
            if at < bytes.len() {
                chunks.push(Bytes::copy_from_slice(&bytes[at..]));
            }
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let got = rt.block_on(read_all(chunks)).expect("reads");
            prop_assert_eq!(got, messages);
        }
    }

    #[tokio::test]
    async fn trailers_end_the_body_with_their_status_after_its_messages() {
        for (code, expected) in [("0", None), ("9", Some(tonic::Code::FailedPrecondition))] {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", code.parse().expect("header"));
            trailers.insert(
                "grpc-message",
                "registered%20twice".parse().expect("header"),
            );
            let body = Frames(
                vec![
                    http_body::Frame::data(Bytes::from(framed(&[b"a".to_vec(), b"b".to_vec()]))),
                    http_body::Frame::trailers(trailers),
                ]
                .into(),
            );
            let mut reader = MessageReader::new(body, usize::MAX);
            for m in [&b"a"[..], b"b"] {
                let got = poll_fn(|cx| reader.poll_message(cx)).await;
                assert_eq!(got.expect("a message").expect("not the end"), m);
            }
            let end = poll_fn(|cx| reader.poll_message(cx)).await;
            match expected {
                None => assert!(matches!(end, Ok(None)), "{end:?}"),
                Some(code) => {
                    let status = end.expect_err("the trailers' status");
                    assert_eq!(status.code(), code);
                    assert_eq!(status.message(), "registered twice");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_body_ending_inside_a_message_is_an_error() {
        let bytes = framed(&[b"hello".to_vec()]);
        let err = read_all(vec![Bytes::copy_from_slice(&bytes[..7])])
            .await
            .expect_err("a cut message accepted");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("middle"), "{err:?}");
    }

    #[tokio::test]
    async fn a_message_over_the_limit_ends_the_body_before_it_is_buffered() {
        let bytes = framed(&[b"ok".to_vec(), vec![7; 100]]);
        // Only the prefix of the long message arrives: the limit is
        // checked there, not once it is whole.
        let head = Bytes::copy_from_slice(&bytes[..7 + 5]);
        let mut reader = MessageReader::new(Frames(vec![http_body::Frame::data(head)].into()), 99);
        let first = poll_fn(|cx| reader.poll_message(cx)).await;
        assert_eq!(first.expect("the first").expect("a message"), &b"ok"[..]);
        let err = poll_fn(|cx| reader.poll_message(cx))
            .await
            .expect_err("a message over the limit accepted");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("100 bytes"), "{err:?}");
        assert!(
            err.message().contains("limit on this stream is 99"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_compressed_message_is_refused_by_name() {
        let mut bytes = framed(&[b"x".to_vec()]);
        bytes[0] = 1;
        let err = read_all(vec![Bytes::from(bytes)])
            .await
            .expect_err("a compressed message accepted");
        assert_eq!(err.code(), tonic::Code::Unimplemented);
        assert!(err.message().contains("compress"), "{err:?}");
    }
}
