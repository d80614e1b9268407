from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InputKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_KIND_UNSPECIFIED: _ClassVar[InputKind]
    INPUT_KIND_TEXT: _ClassVar[InputKind]
    INPUT_KIND_IMAGE: _ClassVar[InputKind]
    INPUT_KIND_TENSOR: _ClassVar[InputKind]

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_REGRESSION: _ClassVar[Task]
    TASK_CLASSIFICATION: _ClassVar[Task]
INPUT_KIND_UNSPECIFIED: InputKind
INPUT_KIND_TEXT: InputKind
INPUT_KIND_IMAGE: InputKind
INPUT_KIND_TENSOR: InputKind
TASK_UNSPECIFIED: Task
TASK_REGRESSION: Task
TASK_CLASSIFICATION: Task

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TextList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class Inputs(_message.Message):
    __slots__ = ("tensors", "texts")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class TextsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TextList
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TextList, _Mapping]] = ...) -> None: ...
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.MessageMap[str, Tensor]
    texts: _containers.MessageMap[str, TextList]
    def __init__(self, tensors: _Optional[_Mapping[str, Tensor]] = ..., texts: _Optional[_Mapping[str, TextList]] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("name", "kind", "dtype", "shape", "needed_for_answer", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NEEDED_FOR_ANSWER_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: InputKind
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    needed_for_answer: bool
    description: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[InputKind, str]] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., needed_for_answer: _Optional[bool] = ..., description: _Optional[str] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TeacherSpec(_message.Message):
    __slots__ = ("protocol", "name", "family", "description", "injection_point", "question_shape", "question_dtypes", "hidden_size", "prediction_shape", "task", "prediction_meaning", "class_names", "inputs", "supports_vjp", "max_rows", "weights_sha256", "compute_dtype")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INJECTION_POINT_FIELD_NUMBER: _ClassVar[int]
    QUESTION_SHAPE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_DTYPES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_MEANING_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_VJP_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    protocol: str
    name: str
    family: str
    description: str
    injection_point: str
    question_shape: _containers.RepeatedScalarFieldContainer[int]
    question_dtypes: _containers.RepeatedScalarFieldContainer[str]
    hidden_size: int
    prediction_shape: _containers.RepeatedScalarFieldContainer[int]
    task: Task
    prediction_meaning: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    inputs: _containers.RepeatedCompositeFieldContainer[InputSpec]
    supports_vjp: bool
    max_rows: int
    weights_sha256: str
    compute_dtype: str
    def __init__(self, protocol: _Optional[str] = ..., name: _Optional[str] = ..., family: _Optional[str] = ..., description: _Optional[str] = ..., injection_point: _Optional[str] = ..., question_shape: _Optional[_Iterable[int]] = ..., question_dtypes: _Optional[_Iterable[str]] = ..., hidden_size: _Optional[int] = ..., prediction_shape: _Optional[_Iterable[int]] = ..., task: _Optional[_Union[Task, str]] = ..., prediction_meaning: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., inputs: _Optional[_Iterable[_Union[InputSpec, _Mapping]]] = ..., supports_vjp: _Optional[bool] = ..., max_rows: _Optional[int] = ..., weights_sha256: _Optional[str] = ..., compute_dtype: _Optional[str] = ...) -> None: ...

class AnswerRequest(_message.Message):
    __slots__ = ("question", "inputs", "output_dtype", "keep_graph")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KEEP_GRAPH_FIELD_NUMBER: _ClassVar[int]
    question: Tensor
    inputs: Inputs
    output_dtype: str
    keep_graph: bool
    def __init__(self, question: _Optional[_Union[Tensor, _Mapping]] = ..., inputs: _Optional[_Union[Inputs, _Mapping]] = ..., output_dtype: _Optional[str] = ..., keep_graph: _Optional[bool] = ...) -> None: ...

class AnswerResponse(_message.Message):
    __slots__ = ("hidden", "prediction", "graph_id")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    prediction: Tensor
    graph_id: str
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., prediction: _Optional[_Union[Tensor, _Mapping]] = ..., graph_id: _Optional[str] = ...) -> None: ...

class AnswerVJPRequest(_message.Message):
    __slots__ = ("question", "inputs", "hidden_cotangent", "prediction_cotangent", "output_dtype", "graph_id")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_COTANGENT_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_COTANGENT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    question: Tensor
    inputs: Inputs
    hidden_cotangent: Tensor
    prediction_cotangent: Tensor
    output_dtype: str
    graph_id: str
    def __init__(self, question: _Optional[_Union[Tensor, _Mapping]] = ..., inputs: _Optional[_Union[Inputs, _Mapping]] = ..., hidden_cotangent: _Optional[_Union[Tensor, _Mapping]] = ..., prediction_cotangent: _Optional[_Union[Tensor, _Mapping]] = ..., output_dtype: _Optional[str] = ..., graph_id: _Optional[str] = ...) -> None: ...

class AnswerVJPResponse(_message.Message):
    __slots__ = ("question_grad",)
    QUESTION_GRAD_FIELD_NUMBER: _ClassVar[int]
    question_grad: Tensor
    def __init__(self, question_grad: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("inputs", "output_dtype")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    inputs: Inputs
    output_dtype: str
    def __init__(self, inputs: _Optional[_Union[Inputs, _Mapping]] = ..., output_dtype: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("question", "hidden", "prediction")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    question: Tensor
    hidden: Tensor
    prediction: Tensor
    def __init__(self, question: _Optional[_Union[Tensor, _Mapping]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., prediction: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
