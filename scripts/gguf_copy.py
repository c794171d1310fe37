"""What the GGUF scripts here share: copying a file's metadata into a GGUFWriter,
and writing the writer out.

Imported by requantize_gguf.py and split_gguf.py (run from any folder: Python puts
a script's own folder on the import path).
"""

import sys

from gguf import GGUFValueType
from gguf.constants import Keys


def copy_metadata(reader, writer, skip=(), replace=None):
    """Copies every key/value in the file's order and types.

    Keys in `skip` are left out; for a key in `replace`, its function is called
    with the writer instead, to write that key otherwise. general.alignment is
    copied with add_custom_alignment, which also sets the padding the writer uses
    before and between tensors.
    """
    replace = replace or {}
    for name, field in reader.fields.items():
        # GGUF.version, GGUF.tensor_count and GGUF.kv_count are header fields the
        # reader shows as keys; the writer writes its own header.
        if name.startswith("GGUF.") or name in skip:
            continue
        main_type = field.types[0]
        if name in replace:
            replace[name](writer)
        elif name == Keys.General.ALIGNMENT:
            writer.add_custom_alignment(field.contents())
        elif main_type == GGUFValueType.ARRAY and len(field.types) > 2:
            sys.exit(f"{name}: nested arrays are not supported")
        else:
            sub_type = field.types[-1] if main_type == GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), main_type, sub_type)


def write_out(writer):
    """Writes the header, the key/values and the tensors, and closes the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
