//! A tower layer that refuses a request whose metadata is over the limit,
//! with RESOURCE_EXHAUSTED and a message that names the size and the limit.
//!
//! HTTP/2 itself refuses a header list over its own (larger) limit with an
//! HTTP 431, which gRPC clients can only report as UNKNOWN; this layer sits
//! below that limit so that the usual oversized metadata gets a precise
//! gRPC status instead, before any handler runs.

use std::task::{Context, Poll};

use futures_util::future::{self, Either, Ready};
use tonic::Status;
use tower::{Layer, Service};

/// Refuses requests whose header list is larger than `limit` bytes.
#[derive(Clone, Copy, Debug)]
pub struct MetadataLimitLayer {
    /// The largest header list accepted, counted as HTTP/2 counts it.
    pub limit: usize,
}

impl<S> Layer<S> for MetadataLimitLayer {
    type Service = MetadataLimit<S>;

    fn layer(&self, inner: S) -> MetadataLimit<S> {
        MetadataLimit {
            inner,
            limit: self.limit,
        }
    }
}

/// The service [`MetadataLimitLayer`] makes.
#[derive(Clone, Debug)]
pub struct MetadataLimit<S> {
    /// The routes.
    inner: S,
    /// See [`MetadataLimitLayer::limit`].
    limit: usize,
}

impl<S, B, R> Service<http::Request<B>> for MetadataLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<http::Response<R>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let size = header_list_size(&request);
        if size <= self.limit {
            return Either::Left(self.inner.call(request));
        }
        tracing::debug!(size, limit = self.limit, path = %request.uri().path(), "refused oversized metadata");
        let status = Status::resource_exhausted(format!(
            "the request metadata is {size} bytes; the limit is {} bytes",
            self.limit
        ));
        Either::Right(future::ready(Ok(status.into_http())))
    }
}

/// The size of a request's header list as HTTP/2 counts it (RFC 9113
/// §6.5.2): each field's name and value plus 32, pseudo-headers included.
fn header_list_size<B>(request: &http::Request<B>) -> usize {
    const OVERHEAD: usize = 32;
    let fields: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + OVERHEAD)
        .sum();
    let uri = request.uri();
    let pseudo = [
        (":method", request.method().as_str().len()),
        (
            ":path",
            uri.path_and_query().map_or(1, |p| p.as_str().len()),
        ),
        (":scheme", uri.scheme_str().map_or(0, str::len)),
        (
            ":authority",
            uri.authority().map_or(0, |a| a.as_str().len()),
        ),
    ];
    fields
        + pseudo
            .iter()
            .map(|(name, len)| name.len() + len + OVERHEAD)
            .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_names_values_and_pseudo_headers() {
        let request = http::Request::builder()
            .method("POST")
            .uri("http://127.0.0.1:1/clutch.v1.Admin/List")
            .header("authorization", "Bearer 0123456789abcdef")
            .body(())
            .expect("a request");
        let expected = ("authorization".len() + "Bearer 0123456789abcdef".len() + 32)
            + (":method".len() + 4 + 32)
            + (":path".len() + "/clutch.v1.Admin/List".len() + 32)
            + (":scheme".len() + 4 + 32)
            + (":authority".len() + "127.0.0.1:1".len() + 32);
        assert_eq!(header_list_size(&request), expected);
    }
}
