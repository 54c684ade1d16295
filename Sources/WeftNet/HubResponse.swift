#if canImport(Glibc)
import Glibc
#endif
import WeftProto

/// The result of a successful `HubAPI` call, one case per result shape. The opcode of the
/// response frame says which method produced it, and so which shape the payload has.
public enum HubResponse: Equatable, Sendable {
    /// closeSession, unlink, rmdir, rename, access, release, setxattr, removexattr, writeSlice, sync.
    case empty
    /// openSession, openVolumeSession.
    case session(SessionID, VolumeInfo)
    /// lookup, getattr, setattr, create, mkdir, symlink, link, open, commitSlices.
    case attributes(Attributes)
    /// readlink, getxattr, readSlice; clusterMap and createVolume (JSON).
    case bytes([UInt8])
    /// readdir.
    case entries([DirectoryEntry])
    /// listxattr.
    case names([[UInt8]])
    /// statfs.
    case fileSystemStats(FileSystemStats)
    /// allocateSliceIDs.
    case firstSliceID(SliceID)
    /// layout.
    case layout(Attributes, [[Slice]])
    /// openLayout.
    case openedLayout(OpenedLayout)
    /// status.
    case status(HubStatus)
    /// fsck.
    case fsckReport(FsckReport)
    /// fsckRemaining: the report with its `remaining` list.
    case fsckResult(FsckReport)
    /// lock.
    case lock(LockDescription)
    /// acquireWriteLease.
    case flag(Bool)
    /// fetchObject: the object file's length and the requested bytes of it.
    case objectPart(fileBytes: UInt32, [UInt8])
    /// createOpen.
    case created(CreatedFile)
    /// unlinkEntry: the parent's attributes after the change, if the hub told them.
    case unlinked(Attributes?)

    /// Whether this is the result shape of `opcode`.
    func fits(_ opcode: HubOpcode) -> Bool {
        switch (self, opcode) {
        case (.empty, .closeSession), (.empty, .ping), (.empty, .fence), (.empty, .unlink), (.empty, .rmdir), (.empty, .rename), (.empty, .access),
             (.empty, .release), (.empty, .setxattr), (.empty, .removexattr), (.empty, .writeSlice), (.empty, .writeObject), (.empty, .sync), (.empty, .barrier), (.empty, .syncFile), (.empty, .adoptObject),
             (.session, .openSession),
             (.attributes, .lookup), (.attributes, .getattr), (.attributes, .setattr), (.attributes, .create),
             (.attributes, .mkdir), (.attributes, .symlink), (.attributes, .link), (.attributes, .open),
             (.attributes, .commitSlices), (.unlinked, .unlinkEntry),
             (.bytes, .readlink), (.bytes, .getxattr), (.bytes, .readSlice),
             (.entries, .readdir), (.names, .listxattr), (.fileSystemStats, .statfs),
             (.firstSliceID, .allocateSliceIDs), (.layout, .layout), (.openedLayout, .openLayout), (.status, .status), (.fsckReport, .fsck), (.fsckResult, .fsckRemaining),
             (.session, .openVolumeSession), (.bytes, .clusterMap), (.bytes, .localReads), (.bytes, .createVolume), (.lock, .lock),
             (.empty, .enableLeases), (.empty, .recall), (.flag, .acquireWriteLease), (.flag, .reclaimWriteLease),
             (.session, .openDataSession), (.bytes, .readSliceFrom), (.objectPart, .fetchObject),
             (.empty, .releaseUploads), (.empty, .deleteObjects), (.empty, .discardUploads), (.empty, .releaseMany),
             (.created, .createOpen):
            return true
        default:
            return false
        }
    }

    var shapeName: String {
        switch self {
        case .empty: "empty"
        case .session: "session"
        case .attributes: "attributes"
        case .bytes: "bytes"
        case .entries: "entries"
        case .names: "names"
        case .fileSystemStats: "fileSystemStats"
        case .firstSliceID: "firstSliceID"
        case .layout: "layout"
        case .openedLayout: "openedLayout"
        case .status: "status"
        case .fsckReport: "fsckReport"
        case .fsckResult: "fsckResult"
        case .lock: "lock"
        case .flag: "flag"
        case .objectPart: "objectPart"
        case .created: "created"
        case .unlinked: "unlinked"
        }
    }

    /// Writes the result, except the bytes of `.bytes` (a readSlice may carry 64 MiB): their u32
    /// length is written and they are returned, to be appended as they are.
    func encodeHead(into w: inout ByteWriter) -> [UInt8]? {
        switch self {
        case .empty:
            break
        case let .session(session, volume):
            w.u64(session); volume.encode(into: &w)
        case let .attributes(attributes):
            attributes.encode(into: &w)
        case let .bytes(bytes):
            w.u32(UInt32(bytes.count))
            return bytes
        case let .entries(entries):
            w.u32(UInt32(entries.count))
            for entry in entries { w.blob(entry.name); w.u64(entry.ino); entry.attributes.encode(into: &w) }
        case let .names(names):
            w.u32(UInt32(names.count))
            for name in names { w.blob(name) }
        case let .fileSystemStats(stats):
            stats.encode(into: &w)
        case let .firstSliceID(id):
            w.u64(id)
        case let .layout(attributes, chunks):
            Self.encodeLayout(attributes, chunks, into: &w)
        case let .openedLayout(opened):
            Self.encodeLayout(opened.attributes, opened.chunks, into: &w)
            w.blob(opened.data)
        case let .status(status):
            status.encode(into: &w)
        case let .fsckReport(report):
            report.encode(into: &w)
        case let .fsckResult(report):
            report.encode(into: &w, withRemaining: true)
        case let .lock(description):
            description.encode(into: &w)
        case let .flag(value):
            w.bool(value)
        case let .objectPart(fileBytes, bytes):
            w.u32(fileBytes); w.u32(UInt32(bytes.count))
            return bytes
        case let .created(created):
            created.attributes.encode(into: &w)
            w.bool(created.parent != nil)
            created.parent?.encode(into: &w)
            w.bool(created.writeLeased)
        case let .unlinked(parent):
            w.bool(parent != nil)
            parent?.encode(into: &w)
        }
        return nil
    }

    /// Bytes of an encoded `Attributes`: version byte, 5 × u32, 6 × u64.
    static let attributesEncodedBytes = 1 + 5 * 4 + 6 * 8

    /// `Attributes`, then `list<list<Slice>>`: a `layout` reply, and the head of an `openLayout` one.
    private static func encodeLayout(_ attributes: Attributes, _ chunks: [[Slice]], into w: inout ByteWriter) {
        attributes.encode(into: &w)
        w.u32(UInt32(chunks.count))
        for slices in chunks {
            w.u32(UInt32(slices.count))
            for slice in slices { slice.encode(into: &w) }
        }
    }

    private static func decodeLayout(from r: inout ByteReader) throws -> (Attributes, [[Slice]]) {
        let attributes = try Attributes.decode(from: &r)
        let chunkCount = try r.listCount(minimumElementBytes: 4)
        var chunks: [[Slice]] = []
        chunks.reserveCapacity(chunkCount)
        for _ in 0..<chunkCount {
            let sliceCount = try r.listCount(minimumElementBytes: Slice.encodedBytes)
            var slices: [Slice] = []
            slices.reserveCapacity(sliceCount)
            for _ in 0..<sliceCount { slices.append(try Slice.decode(from: &r)) }
            chunks.append(slices)
        }
        return (attributes, chunks)
    }

    /// Reads the success payload of a response to `opcode`. Leaves any trailing bytes to the caller.
    static func decode(opcode: HubOpcode, from r: inout ByteReader) throws -> HubResponse {
        switch opcode {
        case .closeSession, .unlink, .rmdir, .rename, .access, .release, .setxattr, .removexattr, .writeSlice, .writeObject, .sync, .ping, .fence,
             .enableLeases, .recall, .releaseUploads, .deleteObjects, .discardUploads, .releaseMany, .barrier, .syncFile, .adoptObject:
            return .empty
        case .acquireWriteLease, .reclaimWriteLease:
            return .flag(try r.bool())
        case .openSession, .openVolumeSession, .openDataSession:
            return .session(try r.u64(), try VolumeInfo.decode(from: &r))
        case .lookup, .getattr, .setattr, .create, .mkdir, .symlink, .link, .open, .commitSlices:
            return .attributes(try Attributes.decode(from: &r))
        case .readlink, .getxattr, .readSlice, .clusterMap, .localReads, .createVolume, .readSliceFrom:
            return .bytes(try r.blob())
        case .readBlocks:
            // Its own decoder reads it straight into the caller's memory (WireCodec.decodeStoredBlocks).
            throw WeftError(EPROTO, "a readBlocks response has no generic decoding")
        case .readdir:
            let count = try r.listCount(minimumElementBytes: 4 + 8 + attributesEncodedBytes)
            var entries: [DirectoryEntry] = []
            entries.reserveCapacity(count)
            for _ in 0..<count {
                entries.append(DirectoryEntry(name: try r.blob(), ino: try r.u64(), attributes: try Attributes.decode(from: &r)))
            }
            return .entries(entries)
        case .listxattr:
            let count = try r.listCount(minimumElementBytes: 4)
            var names: [[UInt8]] = []
            names.reserveCapacity(count)
            for _ in 0..<count { names.append(try r.blob()) }
            return .names(names)
        case .statfs:
            return .fileSystemStats(try FileSystemStats.decode(from: &r))
        case .allocateSliceIDs:
            return .firstSliceID(try r.u64())
        case .layout:
            let (attributes, chunks) = try decodeLayout(from: &r)
            return .layout(attributes, chunks)
        case .openLayout:
            let (attributes, chunks) = try decodeLayout(from: &r)
            return .openedLayout(OpenedLayout(attributes: attributes, chunks: chunks, data: try r.blob()))
        case .status:
            return .status(try HubStatus.decode(from: &r))
        case .fsck:
            return .fsckReport(try FsckReport.decode(from: &r))
        case .fsckRemaining:
            return .fsckResult(try FsckReport.decode(from: &r, withRemaining: true))
        case .lock:
            return .lock(try LockDescription.decode(from: &r))
        case .fetchObject:
            return .objectPart(fileBytes: try r.u32(), try r.blob())
        case .createOpen:
            let attributes = try Attributes.decode(from: &r)
            let parent = try r.bool() ? try Attributes.decode(from: &r) : nil
            return .created(CreatedFile(attributes: attributes, parent: parent, writeLeased: try r.bool()))
        case .unlinkEntry:
            return .unlinked(try r.bool() ? try Attributes.decode(from: &r) : nil)
        }
    }
}
