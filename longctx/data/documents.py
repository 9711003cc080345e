"""Documents from local files (JSON lines, text, parquet), by index, each error naming its file:line."""

import json
import os
from array import array

from longctx.base import DataError

_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}



def load_documents(path: str, fmt: str = "auto", text_field: str | None = "text", section: str = "training"):
    """Documents from a local file or folder (no network), by index. JSON lines and text are
    read here, line by line (`LineRecords`); parquet through `datasets` (memory-mapped Arrow).
    Reading a document checks it and names its file:line (parquet: its row); with text_field,
    that its text_field is a string. text_field=None: the caller checks its own fields.
    `section` is the config section whose dataset_path and dataset a refusal blames (training,
    or validation for held-out documents)."""
    key = f"{section}.dataset_path"
    if not path or not os.path.exists(path):
        raise DataError(f"{key}={path!r} does not exist; point it at a local text/jsonl/parquet file or folder")
    files = sorted(os.path.join(path, f) for f in os.listdir(path)) if os.path.isdir(path) else [path]
    if fmt == "auto":
        kinds = {_FORMATS.get(os.path.splitext(f)[1]) for f in files}
        if len(kinds) != 1 or None in kinds:
            raise DataError(f"cannot tell the format of {key}={path!r} from extensions "
                            f"{sorted({os.path.splitext(f)[1] for f in files})}; set {section}.dataset to text, json or parquet")
        fmt = kinds.pop()
    records = ParquetRecords(key, path, files, text_field) if fmt == "parquet" else LineRecords(key, path, files, fmt, text_field)
    records[0]  # the first document's format and fields are checked before any work starts
    return records



class Records:
    """Documents by index. Subclasses read one (`_read`) and say where it is (`where`)."""

    text_field: str | None

    def __getitem__(self, index: int | slice) -> dict | list[dict]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        record = self._read(index)
        if self.text_field is not None and not isinstance(record.get(self.text_field), str):
            found = "missing" if record.get(self.text_field) is None else f"{record[self.text_field]!r:.60}, not a string"
            raise DataError(f"{self.where(index)}: {self.text_field!r} is {found}; every record needs a string "
                            f"{self.text_field!r} (recipe.text_field names the field)")
        return record

    @property
    def column_names(self) -> list[str]:
        return list(self._read(0))



class LineRecords(Records):
    """JSON lines (one object per line) or text (one document per line) of local files, read on
    access through an index of where each non-blank line starts: 20 bytes per document instead
    of a copy of the corpus, so corpora of any size load in one pass (~1 s per GB) and every
    error names its file:line. Blank (whitespace-only) lines are not documents."""

    def __init__(self, key: str, path: str, files: list[str], fmt: str, text_field: str | None):
        self.files, self.fmt, self.text_field = files, fmt, text_field
        self.file_index, self.offsets, self.line_numbers = array("i"), array("q"), array("q")
        for index, file in enumerate(files):
            with open(file, "rb") as f:
                offset = 0
                for number, line in enumerate(f, 1):
                    if line.strip():
                        self.file_index.append(index)
                        self.offsets.append(offset)
                        self.line_numbers.append(number)
                    offset += len(line)
        if not self.offsets:
            raise DataError(f"{key}={path!r} has no documents (empty, or only blank lines); "
                            "point it at a corpus with text")

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, index: int) -> str:
        return f"{self.files[self.file_index[index]]}:{self.line_numbers[index]}"

    def _read(self, index: int) -> dict:
        with open(self.files[self.file_index[index]], "rb") as f:
            f.seek(self.offsets[index])
            line = f.readline()
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{self.where(index)}: not UTF-8 (byte {line[e.start:e.start + 1]!r} at column "
                            f"{e.start + 1}); re-encode the file as UTF-8") from None
        if self.fmt == "text":
            return {"text": text.rstrip("\r\n")}
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{self.where(index)}: not valid JSON ({e.msg.removesuffix(' at')}, column {e.colno}); "
                            "JSON lines hold one object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{self.where(index)}: a {type(record).__name__}, not a JSON object; "
                            "JSON lines hold one object {...} per line")
        return record



class ParquetRecords(Records):
    """Parquet through `datasets` (memory-mapped Arrow, any size); errors name the row."""

    def __init__(self, key: str, path: str, files: list[str], text_field: str | None):
        try:
            import datasets
        except ImportError:  # e.g. a machine without pyarrow: JSON lines and text still load
            raise DataError("reading parquet needs the `datasets` package (pip install datasets)") from None
        datasets.disable_progress_bars()
        try:
            self.rows = datasets.load_dataset("parquet", data_files=files, split="train")
        except Exception as e:  # pyarrow raises many types for unreadable files
            raise DataError(f"could not read {key}={path!r} as parquet: {' '.join(str(e).split())[:200]}") from None
        if len(self.rows) == 0:
            raise DataError(f"{key}={path!r} has no rows")
        self.path, self.text_field = path, text_field

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, index: int) -> str:
        return f"{self.path} row {index}"

    def _read(self, index: int) -> dict:
        return self.rows[index]

