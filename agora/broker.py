"""The embedded default's Celery broker: kombu's filesystem transport, made safe for several processes.

kombu's transport creates a message file under its final name and then writes it; a worker polling the
folder can move and read the file in between, get an empty payload and die on the JSON error (the
round it was meant to check then waits for a restarted worker). Here a message is written under a name
the reader ignores and renamed into place once complete, and a payload that still cannot be read is
logged and skipped instead of stopping the worker.
"""

from __future__ import annotations

import logging
import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

log = logging.getLogger(__name__)


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # The reader takes only names whose text after the first dot is "<queue>.msg"; this one is not.
        partial = os.path.join(self.data_folder_out, f".{name}.partial")
        try:
            with open(partial, "wb") as fh:
                fh.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            try:
                os.unlink(partial)
            except OSError:
                pass
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue):
        while True:  # each attempt consumes one file, so this ends with a message or Empty
            try:
                return super()._get(queue)
            except ValueError:
                log.warning("skipped an unreadable message in queue %s", queue, exc_info=True)


class Transport(filesystem.Transport):
    Channel = Channel
