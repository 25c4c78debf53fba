"""A local Google Cloud Storage for the tests: gcp-storage-emulator (in memory), with the one header
tensorstore needs that it does not send (`x-goog-generation` on object downloads; without it every
Orbax read of a gs:// checkpoint fails with "Malformed StorageGeneration").

    python -m tests.workers.gcs_emulator PORT BUCKET

Clients reach it through STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage) and
TENSORSTORE_GCS_HTTP_URL (tensorstore, Orbax's array store), both http://127.0.0.1:PORT.
"""

import sys

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        return
    response["x-goog-generation"] = str(obj["generation"])


objects.download = download  # before the server module builds its routing table from it

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    port, bucket = sys.argv[1:3]
    main(["start", "--host=127.0.0.1", f"--port={port}", f"--default-bucket={bucket}", "--in-memory", "--quiet"])
