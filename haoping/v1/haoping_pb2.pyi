from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]

class ScoreNormalization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORE_NORMALIZATION_NONE: _ClassVar[ScoreNormalization]
    SCORE_NORMALIZATION_SIGMOID: _ClassVar[ScoreNormalization]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
SCORE_NORMALIZATION_NONE: ScoreNormalization
SCORE_NORMALIZATION_SIGMOID: ScoreNormalization

class GenerateRequest(_message.Message):
    __slots__ = ("prompts", "samples_per_prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "min_new_tokens", "first_sample_index")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    samples_per_prompt: int
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    min_new_tokens: int
    first_sample_index: int
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., samples_per_prompt: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., min_new_tokens: _Optional[int] = ..., first_sample_index: _Optional[int] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("prompt_index", "sample_index", "prompt_token_ids", "response_token_ids", "text", "full_text", "finish_reason", "policy_version")
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FULL_TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    prompt_index: int
    sample_index: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    response_token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    full_text: str
    finish_reason: FinishReason
    policy_version: int
    def __init__(self, prompt_index: _Optional[int] = ..., sample_index: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., response_token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., full_text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., policy_version: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("samples", "policy_version", "seconds")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    policy_version: int
    seconds: float
    def __init__(self, samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., policy_version: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("prompt_index", "sample_index", "text_delta", "finished", "sample")
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    prompt_index: int
    sample_index: int
    text_delta: str
    finished: bool
    sample: Sample
    def __init__(self, prompt_index: _Optional[int] = ..., sample_index: _Optional[int] = ..., text_delta: _Optional[str] = ..., finished: _Optional[bool] = ..., sample: _Optional[_Union[Sample, _Mapping]] = ...) -> None: ...

class LoadWeightsRequest(_message.Message):
    __slots__ = ("trainer_address", "version")
    TRAINER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    trainer_address: str
    version: int
    def __init__(self, trainer_address: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class LoadWeightsResponse(_message.Message):
    __slots__ = ("policy_version", "bytes", "seconds", "phase_seconds", "transport")
    class PhaseSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PHASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    bytes: int
    seconds: float
    phase_seconds: _containers.ScalarMap[str, float]
    transport: str
    def __init__(self, policy_version: _Optional[int] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., phase_seconds: _Optional[_Mapping[str, float]] = ..., transport: _Optional[str] = ...) -> None: ...

class GeneratorJoinWeightGroupRequest(_message.Message):
    __slots__ = ("group_id", "trainer_address")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    trainer_address: str
    def __init__(self, group_id: _Optional[str] = ..., trainer_address: _Optional[str] = ...) -> None: ...

class ReceiveWeightsRequest(_message.Message):
    __slots__ = ("group_id",)
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    def __init__(self, group_id: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("texts", "normalization")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    normalization: ScoreNormalization
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., normalization: _Optional[_Union[ScoreNormalization, str]] = ...) -> None: ...

class TextScore(_message.Message):
    __slots__ = ("score", "label", "raw_score", "truncated")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    score: float
    label: str
    raw_score: float
    truncated: bool
    def __init__(self, score: _Optional[float] = ..., label: _Optional[str] = ..., raw_score: _Optional[float] = ..., truncated: _Optional[bool] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "model_id", "backend")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[TextScore]
    model_id: str
    backend: str
    def __init__(self, scores: _Optional[_Iterable[_Union[TextScore, _Mapping]]] = ..., model_id: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("query_token_ids", "response_token_ids", "reward", "policy_version")
    QUERY_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    query_token_ids: _containers.RepeatedScalarFieldContainer[int]
    response_token_ids: _containers.RepeatedScalarFieldContainer[int]
    reward: float
    policy_version: int
    def __init__(self, query_token_ids: _Optional[_Iterable[int]] = ..., response_token_ids: _Optional[_Iterable[int]] = ..., reward: _Optional[float] = ..., policy_version: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("rollouts", "min_new_tokens", "step_id")
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[Rollout]
    min_new_tokens: int
    step_id: str
    def __init__(self, rollouts: _Optional[_Iterable[_Union[Rollout, _Mapping]]] = ..., min_new_tokens: _Optional[int] = ..., step_id: _Optional[str] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("policy_version", "stats", "repeated")
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    REPEATED_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    stats: _containers.ScalarMap[str, float]
    repeated: bool
    def __init__(self, policy_version: _Optional[int] = ..., stats: _Optional[_Mapping[str, float]] = ..., repeated: _Optional[bool] = ...) -> None: ...

class GetWeightsRequest(_message.Message):
    __slots__ = ("version", "as_local_file")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AS_LOCAL_FILE_FIELD_NUMBER: _ClassVar[int]
    version: int
    as_local_file: bool
    def __init__(self, version: _Optional[int] = ..., as_local_file: _Optional[bool] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("policy_version", "offset", "total_bytes", "data", "sha256", "file_tag")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FILE_TAG_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    offset: int
    total_bytes: int
    data: bytes
    sha256: str
    file_tag: str
    def __init__(self, policy_version: _Optional[int] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ..., file_tag: _Optional[str] = ...) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("directory", "label", "coordinator_state")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_STATE_FIELD_NUMBER: _ClassVar[int]
    directory: str
    label: str
    coordinator_state: bytes
    def __init__(self, directory: _Optional[str] = ..., label: _Optional[str] = ..., coordinator_state: _Optional[bytes] = ...) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("directory", "policy_version", "label", "steps_done")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    directory: str
    policy_version: int
    label: str
    steps_done: int
    def __init__(self, directory: _Optional[str] = ..., policy_version: _Optional[int] = ..., label: _Optional[str] = ..., steps_done: _Optional[int] = ...) -> None: ...

class OpenWeightGroupRequest(_message.Message):
    __slots__ = ("generators",)
    GENERATORS_FIELD_NUMBER: _ClassVar[int]
    generators: int
    def __init__(self, generators: _Optional[int] = ...) -> None: ...

class JoinWeightGroupRequest(_message.Message):
    __slots__ = ("group_id", "member_id")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    member_id: str
    def __init__(self, group_id: _Optional[str] = ..., member_id: _Optional[str] = ...) -> None: ...

class WeightGroup(_message.Message):
    __slots__ = ("group_id", "address", "port", "world_size", "rank", "policy_version", "timeout_seconds", "backend")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    address: str
    port: int
    world_size: int
    rank: int
    policy_version: int
    timeout_seconds: float
    backend: str
    def __init__(self, group_id: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., world_size: _Optional[int] = ..., rank: _Optional[int] = ..., policy_version: _Optional[int] = ..., timeout_seconds: _Optional[float] = ..., backend: _Optional[str] = ...) -> None: ...

class BroadcastWeightsRequest(_message.Message):
    __slots__ = ("group_id", "version")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    version: int
    def __init__(self, group_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class BroadcastWeightsResponse(_message.Message):
    __slots__ = ("policy_version", "bytes", "seconds", "refused_ranks", "phase_seconds")
    class PhaseSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_RANKS_FIELD_NUMBER: _ClassVar[int]
    PHASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    bytes: int
    seconds: float
    refused_ranks: _containers.RepeatedScalarFieldContainer[int]
    phase_seconds: _containers.ScalarMap[str, float]
    def __init__(self, policy_version: _Optional[int] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., refused_ranks: _Optional[_Iterable[int]] = ..., phase_seconds: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceInfo(_message.Message):
    __slots__ = ("service", "model_id", "policy_version", "dtype", "device", "max_context", "limits", "backend")
    class LimitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    service: str
    model_id: str
    policy_version: int
    dtype: str
    device: str
    max_context: int
    limits: _containers.ScalarMap[str, int]
    backend: str
    def __init__(self, service: _Optional[str] = ..., model_id: _Optional[str] = ..., policy_version: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., max_context: _Optional[int] = ..., limits: _Optional[_Mapping[str, int]] = ..., backend: _Optional[str] = ...) -> None: ...
