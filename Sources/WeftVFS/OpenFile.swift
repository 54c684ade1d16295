import Foundation
import WeftProto

/// Buffered bytes not yet committed, at `offsetInChunk` of one chunk.
struct Extent {
    var offsetInChunk: UInt32
    var bytes: [UInt8]
}

/// The agent's state for one open inode, shared by all its handles: last known attributes,
/// cached layouts and the write-back buffer. Guarded by `lock`.
final class OpenFile {
    let ino: InodeID
    let lock = NSLock()
    var attributes: Attributes
    var handles = 0
    /// Uncommitted writes per chunk index, in write order (later extents cover earlier ones).
    var dirty: [UInt32: [Extent]] = [:]
    var dirtyBytes = 0
    /// Largest end offset of any uncommitted write.
    var dirtyEnd: UInt64 = 0
    var dirtyMtimeNs: Int64 = 0
    /// Cached slice lists, valid for `attributes.dataVersion`.
    var layouts: [UInt32: [Slice]] = [:]
    /// The data version the kernel's page cache holds for this inode.
    var kernelCacheVersion: UInt64 = 0

    init(attributes: Attributes) {
        ino = attributes.ino
        self.attributes = attributes
    }

    var hasDirtyData: Bool { !dirty.isEmpty }

    /// Attributes as this agent sees them: committed ones, extended by buffered writes.
    var visibleAttributes: Attributes {
        var visible = attributes
        if hasDirtyData {
            visible.size = max(visible.size, dirtyEnd)
            visible.allocatedBytes += UInt64(dirtyBytes)
            visible.mtimeNs = max(visible.mtimeNs, dirtyMtimeNs)
            visible.ctimeNs = max(visible.ctimeNs, dirtyMtimeNs)
        }
        return visible
    }

    /// Adopts attributes from the hub; a new data version invalidates cached layouts.
    /// Attributes fetched before a newer commit of this agent are ignored (a reply may arrive
    /// after the commit that superseded it).
    func adopt(_ fresh: Attributes) {
        guard fresh.dataVersion >= attributes.dataVersion else { return }
        if fresh.dataVersion != attributes.dataVersion { layouts.removeAll(keepingCapacity: true) }
        attributes = fresh
    }

    /// Buffers `data` at file offset `offset`, split at chunk boundaries.
    func buffer(_ data: UnsafeRawBufferPointer, at offset: UInt64, chunkSizeBytes: Int) {
        var position = 0
        while position < data.count {
            let fileOffset = offset + UInt64(position)
            let index = UInt32(fileOffset / UInt64(chunkSizeBytes))
            let offsetInChunk = Int(fileOffset % UInt64(chunkSizeBytes))
            let take = min(data.count - position, chunkSizeBytes - offsetInChunk)
            let piece = UnsafeRawBufferPointer(rebasing: data[position..<position + take])
            // Append in place when the write continues the last extent (no copy of the buffer).
            let continuesLast: Bool = {
                guard let last = dirty[index]?.last else { return false }
                return Int(last.offsetInChunk) + last.bytes.count == offsetInChunk
            }()
            if continuesLast {
                let last = dirty[index]!.count - 1
                dirty[index]![last].bytes.append(contentsOf: piece)
            } else {
                var bytes: [UInt8] = []
                bytes.reserveCapacity(offsetInChunk == 0 ? chunkSizeBytes : take)
                bytes.append(contentsOf: piece)
                dirty[index, default: []].append(Extent(offsetInChunk: UInt32(offsetInChunk), bytes: bytes))
            }
            position += take
        }
        dirtyBytes += data.count
        dirtyEnd = max(dirtyEnd, offset + UInt64(data.count))
        dirtyMtimeNs = currentTimeNs()
    }

    /// True when some chunk's buffered bytes reach a whole chunk (time to upload it).
    func hasFullChunk(chunkSizeBytes: Int) -> Bool {
        dirty.values.contains { extents in extents.reduce(0) { $0 + $1.bytes.count } >= chunkSizeBytes }
    }
}

/// One open file handle.
final class FileHandle {
    let file: OpenFile
    let flags: Int32
    let context: RequestContext
    let lock = NSLock()
    /// End of the previous read, to detect sequential access.
    var lastReadEnd: UInt64 = 0
    var readaheadWindowBytes: UInt64 = 0
    var prefetchedUpTo: UInt64 = 0

    init(file: OpenFile, flags: Int32, context: RequestContext) {
        self.file = file
        self.flags = flags
        self.context = context
    }
}

/// One open directory: entries fetched page by page; a readdir offset is an index into them.
final class DirectoryHandle {
    let ino: InodeID
    let context: RequestContext
    let lock = NSLock()
    var entries: [DirectoryEntry] = []
    var complete = false

    init(ino: InodeID, context: RequestContext) {
        self.ino = ino
        self.context = context
    }
}
