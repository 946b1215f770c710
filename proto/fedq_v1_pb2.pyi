from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Capabilities(_message.Message):
    __slots__ = ("samples_per_second", "memory_bytes", "upload_bytes_per_second", "codecs")
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    samples_per_second: float
    memory_bytes: int
    upload_bytes_per_second: float
    codecs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, samples_per_second: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., upload_bytes_per_second: _Optional[float] = ..., codecs: _Optional[_Iterable[str]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("client_id", "num_examples", "capabilities", "protocol")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    num_examples: int
    capabilities: Capabilities
    protocol: str
    def __init__(self, client_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., protocol: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("token", "current_round", "plan", "model_name")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    token: str
    current_round: int
    plan: TrainingPlan
    model_name: str
    def __init__(self, token: _Optional[str] = ..., current_round: _Optional[int] = ..., plan: _Optional[_Union[TrainingPlan, _Mapping]] = ..., model_name: _Optional[str] = ...) -> None: ...

class TrainingPlan(_message.Message):
    __slots__ = ("round", "dp_mode", "noise_multiplier", "clip_norm", "sample_rate", "batch_size", "local_steps", "learning_rate", "fedprox_mu", "codec", "deadline_unix", "secure_rng", "seed")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DP_MODE_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    FEDPROX_MU_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    SECURE_RNG_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    round: int
    dp_mode: str
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    batch_size: int
    local_steps: int
    learning_rate: float
    fedprox_mu: float
    codec: str
    deadline_unix: float
    secure_rng: bool
    seed: int
    def __init__(self, round: _Optional[int] = ..., dp_mode: _Optional[str] = ..., noise_multiplier: _Optional[float] = ..., clip_norm: _Optional[float] = ..., sample_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., local_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., fedprox_mu: _Optional[float] = ..., codec: _Optional[str] = ..., deadline_unix: _Optional[float] = ..., secure_rng: _Optional[bool] = ..., seed: _Optional[int] = ...) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("client_id", "token", "round", "offset")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    token: str
    round: int
    offset: int
    def __init__(self, client_id: _Optional[str] = ..., token: _Optional[str] = ..., round: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("round", "offset", "total_size", "digest", "data")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    round: int
    offset: int
    total_size: int
    digest: str
    data: bytes
    def __init__(self, round: _Optional[int] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., digest: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("client_id", "token", "round", "update_id", "num_examples", "codec", "total_size", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    token: str
    round: int
    update_id: str
    num_examples: int
    codec: str
    total_size: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, client_id: _Optional[str] = ..., token: _Optional[str] = ..., round: _Optional[int] = ..., update_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., codec: _Optional[str] = ..., total_size: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class UpdateTrailer(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    trailer: UpdateTrailer
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[UpdateTrailer, _Mapping]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("outcome", "update_id", "message")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME_UNSPECIFIED: _ClassVar[SubmitReply.Outcome]
        ACCEPTED: _ClassVar[SubmitReply.Outcome]
        DUPLICATE: _ClassVar[SubmitReply.Outcome]
    OUTCOME_UNSPECIFIED: SubmitReply.Outcome
    ACCEPTED: SubmitReply.Outcome
    DUPLICATE: SubmitReply.Outcome
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    outcome: SubmitReply.Outcome
    update_id: str
    message: str
    def __init__(self, outcome: _Optional[_Union[SubmitReply.Outcome, str]] = ..., update_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("client_id", "token", "after_round")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    token: str
    after_round: int
    def __init__(self, client_id: _Optional[str] = ..., token: _Optional[str] = ..., after_round: _Optional[int] = ...) -> None: ...

class RoundEvent(_message.Message):
    __slots__ = ("kind", "round", "selected", "plan", "model_digest", "deadline_unix", "reason")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[RoundEvent.Kind]
        OPENED: _ClassVar[RoundEvent.Kind]
        CLOSED: _ClassVar[RoundEvent.Kind]
        FINISHED: _ClassVar[RoundEvent.Kind]
    KIND_UNSPECIFIED: RoundEvent.Kind
    OPENED: RoundEvent.Kind
    CLOSED: RoundEvent.Kind
    FINISHED: RoundEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: RoundEvent.Kind
    round: int
    selected: bool
    plan: TrainingPlan
    model_digest: str
    deadline_unix: float
    reason: str
    def __init__(self, kind: _Optional[_Union[RoundEvent.Kind, str]] = ..., round: _Optional[int] = ..., selected: _Optional[bool] = ..., plan: _Optional[_Union[TrainingPlan, _Mapping]] = ..., model_digest: _Optional[str] = ..., deadline_unix: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...
