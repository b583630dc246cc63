/**
 * XEP-0136's error conditions, declared once: what the store's named errors become on the wire.
 */
import { StanzaError } from '../../errors.ts';
import {
  ArchiveConflictError,
  CollectionTooLargeError,
  PrefsVersionConflictError,
} from '../../store/archive.ts';

/** §8.2, §8.3: "If the specified collection does not exist then the server MUST return an <item-not-found/> error". */
export function collectionNotFound(): StanzaError {
  return new StanzaError('cancel', 'item-not-found', 'no such collection');
}

/** A store error as the stanza error the client gets; anything else is not the archive's to name. */
export function archiveStanzaError(error: unknown): StanzaError | undefined {
  // §5.3: "If the server cannot service a store request because the collection is too large then
  // it MUST return a <not-acceptable/> error".
  if (error instanceof CollectionTooLargeError)
    return new StanzaError('modify', 'not-acceptable', 'the collection is too large');
  // Two writers raced; the client may send the same request again.
  if (error instanceof ArchiveConflictError || error instanceof PrefsVersionConflictError)
    return new StanzaError('wait', 'resource-constraint', 'the archive changed meanwhile; try again');
  return undefined;
}
