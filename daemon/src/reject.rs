//! Why a frame is refused: the vocabulary the decoders speak and the telemetry counts. At the
//! bottom of the module graph (it imports nothing of ours), so decoders and telemetry both
//! depend on it and not on each other.

/// Why a frame was refused (the payload itself is at fault): at ingest, or for image frames when
/// a worker decodes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Zero-length payload (e.g. a cleared retained message).
    Empty,
    /// Larger than the pipeline's `max_payload`.
    Oversized,
    /// Raw payload whose length is not the input's byte size.
    WrongSize,
    /// JSON data whose nesting or element count does not match the input shape.
    WrongShape,
    /// A value that cannot be represented in the input's dtype (fraction for an int, out of range).
    WrongDtype,
    /// NaN or infinity while `nan = "reject"`.
    NonFinite,
    /// Not parseable (invalid JSON, missing fields, wrong types).
    Malformed,
    /// An image frame (jpeg/png) that does not decode: not the declared format, corrupt or
    /// truncated data.
    CorruptImage,
    /// An image whose header declares more than `preprocess.max_decoded` samples
    /// (`width * height * channels`), refused before any pixel buffer is allocated.
    ImageTooLarge,
    /// An image with a channel count the pipeline cannot use (alpha, CMYK), or a stream chunk
    /// whose envelope declares another channel count than the pipeline's window.
    WrongChannels,
    /// A binary frame without a valid edgeinfer envelope (magic, length, version, flags).
    BadEnvelope,
    /// A stream chunk that is not a whole number of frames (one sample of every channel).
    Truncated,
    /// A stream chunk whose envelope declares another sample rate than the pipeline's window.
    WrongSampleRate,
    /// A message whose topic is longer than `broker.max_topic_length` (refused before routing:
    /// no per-device state, no rendered output topic).
    TopicTooLong,
}

impl RejectReason {
    pub const ALL: [RejectReason; 14] = [
        RejectReason::Empty,
        RejectReason::Oversized,
        RejectReason::WrongSize,
        RejectReason::WrongShape,
        RejectReason::WrongDtype,
        RejectReason::NonFinite,
        RejectReason::Malformed,
        RejectReason::CorruptImage,
        RejectReason::ImageTooLarge,
        RejectReason::WrongChannels,
        RejectReason::BadEnvelope,
        RejectReason::Truncated,
        RejectReason::WrongSampleRate,
        RejectReason::TopicTooLong,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Empty => "empty",
            RejectReason::Oversized => "oversized",
            RejectReason::WrongSize => "wrong_size",
            RejectReason::WrongShape => "wrong_shape",
            RejectReason::WrongDtype => "wrong_dtype",
            RejectReason::NonFinite => "non_finite",
            RejectReason::Malformed => "malformed",
            RejectReason::CorruptImage => "corrupt_image",
            RejectReason::ImageTooLarge => "image_too_large",
            RejectReason::WrongChannels => "wrong_channels",
            RejectReason::BadEnvelope => "bad_envelope",
            RejectReason::Truncated => "truncated",
            RejectReason::WrongSampleRate => "wrong_sample_rate",
            RejectReason::TopicTooLong => "topic_too_long",
        }
    }
}

/// Why a payload was refused, with a human-readable detail for the error topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    pub reason: RejectReason,
    pub detail: String,
    /// The device's sequence number, when it could be read.
    pub seq: Option<u64>,
}

impl Reject {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into(), seq: None }
    }
}
