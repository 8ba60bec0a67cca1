from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Image(_message.Message):
    __slots__ = ("view", "height", "width", "rgb")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    RGB_FIELD_NUMBER: _ClassVar[int]
    view: str
    height: int
    width: int
    rgb: bytes
    def __init__(self, view: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., rgb: _Optional[bytes] = ...) -> None: ...

class Observation(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("views", "image_height", "image_width", "chunk_size", "action_dim", "action_low", "action_high", "tokens_per_view", "max_chunks_per_branch", "model_name", "model_version", "max_states_per_request", "max_branches_per_request")
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACTION_DIM_FIELD_NUMBER: _ClassVar[int]
    ACTION_LOW_FIELD_NUMBER: _ClassVar[int]
    ACTION_HIGH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_VIEW_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKS_PER_BRANCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_STATES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_BRANCHES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    views: _containers.RepeatedScalarFieldContainer[str]
    image_height: int
    image_width: int
    chunk_size: int
    action_dim: int
    action_low: _containers.RepeatedScalarFieldContainer[float]
    action_high: _containers.RepeatedScalarFieldContainer[float]
    tokens_per_view: int
    max_chunks_per_branch: int
    model_name: str
    model_version: str
    max_states_per_request: int
    max_branches_per_request: int
    def __init__(self, views: _Optional[_Iterable[str]] = ..., image_height: _Optional[int] = ..., image_width: _Optional[int] = ..., chunk_size: _Optional[int] = ..., action_dim: _Optional[int] = ..., action_low: _Optional[_Iterable[float]] = ..., action_high: _Optional[_Iterable[float]] = ..., tokens_per_view: _Optional[int] = ..., max_chunks_per_branch: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., max_states_per_request: _Optional[int] = ..., max_branches_per_request: _Optional[int] = ...) -> None: ...

class StartState(_message.Message):
    __slots__ = ("instruction", "observation")
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    instruction: str
    observation: Observation
    def __init__(self, instruction: _Optional[str] = ..., observation: _Optional[_Union[Observation, _Mapping]] = ...) -> None: ...

class CreateStatesRequest(_message.Message):
    __slots__ = ("states",)
    STATES_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedCompositeFieldContainer[StartState]
    def __init__(self, states: _Optional[_Iterable[_Union[StartState, _Mapping]]] = ...) -> None: ...

class CreateStatesResponse(_message.Message):
    __slots__ = ("state_ids",)
    STATE_IDS_FIELD_NUMBER: _ClassVar[int]
    state_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, state_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ...) -> None: ...

class Branch(_message.Message):
    __slots__ = ("state_id", "actions", "seed", "keep_state")
    STATE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    KEEP_STATE_FIELD_NUMBER: _ClassVar[int]
    state_id: str
    actions: _containers.RepeatedScalarFieldContainer[float]
    seed: int
    keep_state: bool
    def __init__(self, state_id: _Optional[str] = ..., actions: _Optional[_Iterable[float]] = ..., seed: _Optional[int] = ..., keep_state: _Optional[bool] = ...) -> None: ...

class ImagineRequest(_message.Message):
    __slots__ = ("branches", "sampling", "return_images", "return_tokens")
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RETURN_IMAGES_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    branches: _containers.RepeatedCompositeFieldContainer[Branch]
    sampling: SamplingParams
    return_images: bool
    return_tokens: bool
    def __init__(self, branches: _Optional[_Iterable[_Union[Branch, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., return_images: _Optional[bool] = ..., return_tokens: _Optional[bool] = ...) -> None: ...

class ImagineResult(_message.Message):
    __slots__ = ("index", "state_id", "observation", "tokens", "success_prob", "success")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STATE_ID_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_PROB_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    index: int
    state_id: str
    observation: Observation
    tokens: _containers.RepeatedScalarFieldContainer[int]
    success_prob: float
    success: bool
    def __init__(self, index: _Optional[int] = ..., state_id: _Optional[str] = ..., observation: _Optional[_Union[Observation, _Mapping]] = ..., tokens: _Optional[_Iterable[int]] = ..., success_prob: _Optional[float] = ..., success: _Optional[bool] = ...) -> None: ...

class ReleaseStatesRequest(_message.Message):
    __slots__ = ("state_ids",)
    STATE_IDS_FIELD_NUMBER: _ClassVar[int]
    state_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, state_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseStatesResponse(_message.Message):
    __slots__ = ("num_released",)
    NUM_RELEASED_FIELD_NUMBER: _ClassVar[int]
    num_released: int
    def __init__(self, num_released: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Stats(_message.Message):
    __slots__ = ("kv_blocks_total", "kv_blocks_used", "kv_blocks_cached", "live_states", "queue_depth", "tokens_generated", "prefix_cache_hit_rate", "branches_completed", "tokens_per_second")
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    LIVE_STATES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    live_states: int
    queue_depth: int
    tokens_generated: int
    prefix_cache_hit_rate: float
    branches_completed: int
    tokens_per_second: float
    def __init__(self, kv_blocks_total: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_cached: _Optional[int] = ..., live_states: _Optional[int] = ..., queue_depth: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., prefix_cache_hit_rate: _Optional[float] = ..., branches_completed: _Optional[int] = ..., tokens_per_second: _Optional[float] = ...) -> None: ...
