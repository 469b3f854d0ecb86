"""ComfyUI nodes: thin glue over deltasvd/ (host types, devices, folders, progress -> core).

Node ids are a public contract (saved workflows refer to them): never rename one."""

from .apply import DeltaSVDApply, DeltaSVDResize
from .compare import DeltaSVDCompare
from .compress import DeltaSVDCompress, DeltaSVDCompressFiles
from .files import DeltaSVDLoad, DeltaSVDSave
from .spectrum import DeltaSVDSpectrum

NODE_CLASS_MAPPINGS = {
    "DeltaSVDCompress": DeltaSVDCompress,
    "DeltaSVDCompressFiles": DeltaSVDCompressFiles,
    "DeltaSVDSave": DeltaSVDSave,
    "DeltaSVDLoad": DeltaSVDLoad,
    "DeltaSVDApply": DeltaSVDApply,
    "DeltaSVDResize": DeltaSVDResize,
    "DeltaSVDSpectrum": DeltaSVDSpectrum,
    "DeltaSVDCompare": DeltaSVDCompare,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DeltaSVDCompress": "Delta-SVD Compress (models)",
    "DeltaSVDCompressFiles": "Delta-SVD Compress (files)",
    "DeltaSVDSave": "Delta-SVD Save",
    "DeltaSVDLoad": "Delta-SVD Load",
    "DeltaSVDApply": "Delta-SVD Apply",
    "DeltaSVDResize": "Delta-SVD Resize",
    "DeltaSVDSpectrum": "Delta-SVD Spectrum",
    "DeltaSVDCompare": "Delta-SVD Compare",
}
