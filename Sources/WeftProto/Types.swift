#if canImport(Glibc)
import Glibc
#endif

public typealias InodeID = UInt64
public typealias SliceID = UInt64
public typealias SessionID = UInt64

public enum InodeNumbers {
    /// The root directory of a volume.
    public static let root: InodeID = 1
}

/// Who is asking: the caller's uid, gid and supplementary groups, as FUSE reports them.
public struct Credentials: Equatable, Sendable {
    public var uid: UInt32
    public var gid: UInt32
    public var groups: [UInt32]

    public init(uid: UInt32, gid: UInt32, groups: [UInt32] = []) {
        self.uid = uid
        self.gid = gid
        self.groups = groups
    }

    public static let root = Credentials(uid: 0, gid: 0)
    public var isRoot: Bool { uid == 0 }
    public func isMember(of group: UInt32) -> Bool { gid == group || groups.contains(group) }

    public func encode(into w: inout ByteWriter) {
        w.u32(uid); w.u32(gid); w.u32(UInt32(groups.count))
        for g in groups { w.u32(g) }
    }
    public static func decode(from r: inout ByteReader) throws -> Credentials {
        let uid = try r.u32(), gid = try r.u32()
        let n = try r.count(max: 65536)
        var groups: [UInt32] = []
        groups.reserveCapacity(n)
        for _ in 0..<n { groups.append(try r.u32()) }
        return Credentials(uid: uid, gid: gid, groups: groups)
    }
}

/// The session and caller of one hub request.
public struct RequestContext: Equatable, Sendable {
    public var session: SessionID
    public var credentials: Credentials

    public init(session: SessionID, credentials: Credentials) {
        self.session = session
        self.credentials = credentials
    }

    public func encode(into w: inout ByteWriter) {
        w.u64(session)
        credentials.encode(into: &w)
    }
    public static func decode(from r: inout ByteReader) throws -> RequestContext {
        RequestContext(session: try r.u64(), credentials: try Credentials.decode(from: &r))
    }
}

/// POSIX attributes of one inode. Times are nanoseconds since the epoch.
/// `dataVersion` increases on every change of the file's bytes, so a cache tagged with it is valid
/// while it is unchanged.
public struct Attributes: Equatable, Sendable {
    public var ino: InodeID
    public var mode: UInt32
    public var nlink: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var rdev: UInt32
    public var size: UInt64
    public var atimeNs: Int64
    public var mtimeNs: Int64
    public var ctimeNs: Int64
    public var dataVersion: UInt64
    /// Bytes of data written to the file (an upper bound of what it occupies; holes take none).
    /// `st_blocks` reports min(allocatedBytes, size).
    public var allocatedBytes: UInt64

    public init(ino: InodeID, mode: UInt32, nlink: UInt32, uid: UInt32, gid: UInt32, rdev: UInt32 = 0,
                size: UInt64 = 0, atimeNs: Int64 = 0, mtimeNs: Int64 = 0, ctimeNs: Int64 = 0, dataVersion: UInt64 = 0,
                allocatedBytes: UInt64 = 0) {
        self.ino = ino; self.mode = mode; self.nlink = nlink; self.uid = uid; self.gid = gid; self.rdev = rdev
        self.size = size; self.atimeNs = atimeNs; self.mtimeNs = mtimeNs; self.ctimeNs = ctimeNs
        self.dataVersion = dataVersion; self.allocatedBytes = allocatedBytes
    }

    public var fileType: UInt32 { mode & UInt32(S_IFMT) }
    public var isDirectory: Bool { fileType == UInt32(S_IFDIR) }
    public var isRegular: Bool { fileType == UInt32(S_IFREG) }
    public var isSymlink: Bool { fileType == UInt32(S_IFLNK) }

    public static let encodedVersion: UInt8 = 1

    public func encode(into w: inout ByteWriter) {
        w.u8(Self.encodedVersion)
        w.u64(ino); w.u32(mode); w.u32(nlink); w.u32(uid); w.u32(gid); w.u32(rdev)
        w.u64(size); w.i64(atimeNs); w.i64(mtimeNs); w.i64(ctimeNs); w.u64(dataVersion); w.u64(allocatedBytes)
    }
    public static func decode(from r: inout ByteReader) throws -> Attributes {
        guard try r.u8() == encodedVersion else { throw WeftError.malformed }
        return Attributes(ino: try r.u64(), mode: try r.u32(), nlink: try r.u32(), uid: try r.u32(),
                          gid: try r.u32(), rdev: try r.u32(), size: try r.u64(), atimeNs: try r.i64(),
                          mtimeNs: try r.i64(), ctimeNs: try r.i64(), dataVersion: try r.u64(),
                          allocatedBytes: try r.u64())
    }
}

/// A time to set: the hub's current time, or an explicit value.
public enum TimeSetting: Equatable, Sendable {
    case now
    case nanoseconds(Int64)

    func encode(into w: inout ByteWriter) {
        switch self {
        case .now: w.u8(1)
        case .nanoseconds(let ns): w.u8(2); w.i64(ns)
        }
    }
    static func decodeOptional(from r: inout ByteReader) throws -> TimeSetting? {
        switch try r.u8() {
        case 0: return nil
        case 1: return .now
        case 2: return .nanoseconds(try r.i64())
        default: throw WeftError.malformed
        }
    }
}

/// The fields of a setattr; nil means unchanged.
public struct SetAttributes: Equatable, Sendable {
    public var mode: UInt32?
    public var uid: UInt32?
    public var gid: UInt32?
    public var size: UInt64?
    public var atime: TimeSetting?
    public var mtime: TimeSetting?
    /// The change comes through an open file handle (ftruncate, futimens): write permission was
    /// checked at open and is not checked again.
    public var byHandle: Bool

    public init(mode: UInt32? = nil, uid: UInt32? = nil, gid: UInt32? = nil, size: UInt64? = nil,
                atime: TimeSetting? = nil, mtime: TimeSetting? = nil, byHandle: Bool = false) {
        self.mode = mode; self.uid = uid; self.gid = gid; self.size = size; self.atime = atime; self.mtime = mtime
        self.byHandle = byHandle
    }

    public func encode(into w: inout ByteWriter) {
        w.optionalU64(mode.map { UInt64($0) }); w.optionalU64(uid.map { UInt64($0) })
        w.optionalU64(gid.map { UInt64($0) }); w.optionalU64(size)
        if let atime { atime.encode(into: &w) } else { w.u8(0) }
        if let mtime { mtime.encode(into: &w) } else { w.u8(0) }
        w.bool(byHandle)
    }
    public static func decode(from r: inout ByteReader) throws -> SetAttributes {
        func u32(_ v: UInt64?) throws -> UInt32? {
            guard let v else { return nil }
            guard v <= UInt64(UInt32.max) else { throw WeftError.malformed }
            return UInt32(v)
        }
        return SetAttributes(mode: try u32(r.optionalU64()), uid: try u32(r.optionalU64()),
                             gid: try u32(r.optionalU64()), size: try r.optionalU64(),
                             atime: try TimeSetting.decodeOptional(from: &r),
                             mtime: try TimeSetting.decodeOptional(from: &r), byHandle: try r.bool())
    }
}

/// One directory entry. `attributes` is filled for readdirplus.
public struct DirectoryEntry: Equatable, Sendable {
    public var name: [UInt8]
    public var ino: InodeID
    public var attributes: Attributes

    public init(name: [UInt8], ino: InodeID, attributes: Attributes) {
        self.name = name; self.ino = ino; self.attributes = attributes
    }
}

/// RENAME_NOREPLACE and RENAME_EXCHANGE, with Linux's values.
public struct RenameFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let noReplace = RenameFlags(rawValue: 1)
    public static let exchange = RenameFlags(rawValue: 2)
}

/// setxattr flags XATTR_CREATE and XATTR_REPLACE, with Linux's values.
public struct XattrFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let create = XattrFlags(rawValue: 1)
    public static let replace = XattrFlags(rawValue: 2)
}

/// A slice: immutable bytes `[sliceOffset, sliceOffset+length)` of chunk object `id`, laid at
/// `offsetInChunk` of chunk `chunkIndex` of a file. Later slices in a chunk's list cover earlier ones.
/// `id == 0` marks a hole (zeros), used by truncate. `hub` names the hub whose chunk store holds
/// the writer's copy of the object (SPEC.md §12.3): 0 means the volume's home.
public struct Slice: Equatable, Sendable {
    public var id: SliceID
    public var offsetInChunk: UInt32
    public var length: UInt32
    public var sliceOffset: UInt32
    /// Total stored length of chunk object `id` (needed to address its checksum blocks).
    public var objectLength: UInt32
    /// Holder hub id (0 = the home).
    public var hub: UInt16

    public init(id: SliceID, offsetInChunk: UInt32, length: UInt32, sliceOffset: UInt32 = 0, objectLength: UInt32,
                hub: UInt16 = 0) {
        self.id = id; self.offsetInChunk = offsetInChunk; self.length = length
        self.sliceOffset = sliceOffset; self.objectLength = objectLength; self.hub = hub
    }

    /// Wire size (protocol version 2) and size in a version 2 slice-list record.
    public static let encodedBytes = 26
    /// Size without `hub`: version 1 slice-list records (hub 0).
    public static let encodedBytesVersion1 = 24

    public func encode(into w: inout ByteWriter) {
        encodeVersion1(into: &w); w.u16(hub)
    }
    public static func decode(from r: inout ByteReader) throws -> Slice {
        var slice = try decodeVersion1(from: &r)
        slice.hub = try r.u16()
        return slice
    }
    /// The 24-byte form without `hub` (version 1 records in RocksDB).
    public func encodeVersion1(into w: inout ByteWriter) {
        w.u64(id); w.u32(offsetInChunk); w.u32(length); w.u32(sliceOffset); w.u32(objectLength)
    }
    public static func decodeVersion1(from r: inout ByteReader) throws -> Slice {
        Slice(id: try r.u64(), offsetInChunk: try r.u32(), length: try r.u32(), sliceOffset: try r.u32(),
              objectLength: try r.u32())
    }
}

/// A slice being committed to chunk `chunkIndex` of a file.
public struct SliceCommit: Equatable, Sendable {
    public var chunkIndex: UInt32
    public var slice: Slice

    public init(chunkIndex: UInt32, slice: Slice) {
        self.chunkIndex = chunkIndex; self.slice = slice
    }
}

/// Per-volume settings fixed at format time.
public struct VolumeInfo: Equatable, Sendable {
    public var formatVersion: UInt32
    public var uuid: [UInt8]
    public var chunkSizeBytes: UInt32
    public var compression: Compression
    public var createdNs: Int64

    public init(formatVersion: UInt32, uuid: [UInt8], chunkSizeBytes: UInt32, compression: Compression, createdNs: Int64) {
        self.formatVersion = formatVersion; self.uuid = uuid; self.chunkSizeBytes = chunkSizeBytes
        self.compression = compression; self.createdNs = createdNs
    }

    public func encode(into w: inout ByteWriter) {
        w.u32(formatVersion); w.blob(uuid); w.u32(chunkSizeBytes); w.u8(compression.rawValue); w.i64(createdNs)
    }
    public static func decode(from r: inout ByteReader) throws -> VolumeInfo {
        let version = try r.u32()
        let uuid = try r.blob(max: 64)
        let chunk = try r.u32()
        guard let compression = Compression(rawValue: try r.u8()) else { throw WeftError.malformed }
        return VolumeInfo(formatVersion: version, uuid: uuid, chunkSizeBytes: chunk, compression: compression,
                          createdNs: try r.i64())
    }
}

public enum Compression: UInt8, Sendable, CaseIterable {
    case none = 0
    case zstd = 1

    public var name: String { self == .none ? "none" : "zstd" }
    public init?(name: String) {
        switch name {
        case "none": self = .none
        case "zstd": self = .zstd
        default: return nil
        }
    }
}

/// statfs figures. Blocks are `blockSizeBytes` units.
public struct FileSystemStats: Equatable, Sendable {
    public var blockSizeBytes: UInt32
    public var totalBlocks: UInt64
    public var freeBlocks: UInt64
    public var totalInodes: UInt64
    public var freeInodes: UInt64
    public var nameMaxBytes: UInt32

    public init(blockSizeBytes: UInt32, totalBlocks: UInt64, freeBlocks: UInt64, totalInodes: UInt64,
                freeInodes: UInt64, nameMaxBytes: UInt32) {
        self.blockSizeBytes = blockSizeBytes; self.totalBlocks = totalBlocks; self.freeBlocks = freeBlocks
        self.totalInodes = totalInodes; self.freeInodes = freeInodes; self.nameMaxBytes = nameMaxBytes
    }

    public func encode(into w: inout ByteWriter) {
        w.u32(blockSizeBytes); w.u64(totalBlocks); w.u64(freeBlocks); w.u64(totalInodes); w.u64(freeInodes)
        w.u32(nameMaxBytes)
    }
    public static func decode(from r: inout ByteReader) throws -> FileSystemStats {
        FileSystemStats(blockSizeBytes: try r.u32(), totalBlocks: try r.u64(), freeBlocks: try r.u64(),
                        totalInodes: try r.u64(), freeInodes: try r.u64(), nameMaxBytes: try r.u32())
    }
}

/// What `weft status` shows.
public struct HubStatus: Equatable, Sendable {
    public var volume: VolumeInfo
    /// Sum of file sizes (logical bytes).
    public var logicalBytes: UInt64
    public var inodes: UInt64
    public var chunks: UInt64
    /// Bytes the chunk store occupies on disk.
    public var storedBytes: UInt64
    public var connectedAgents: UInt32
    public var agents: [String]

    public init(volume: VolumeInfo, logicalBytes: UInt64, inodes: UInt64, chunks: UInt64, storedBytes: UInt64,
                connectedAgents: UInt32, agents: [String]) {
        self.volume = volume; self.logicalBytes = logicalBytes; self.inodes = inodes; self.chunks = chunks
        self.storedBytes = storedBytes; self.connectedAgents = connectedAgents; self.agents = agents
    }

    public func encode(into w: inout ByteWriter) {
        volume.encode(into: &w)
        w.u64(logicalBytes); w.u64(inodes); w.u64(chunks); w.u64(storedBytes); w.u32(connectedAgents)
        w.u32(UInt32(agents.count))
        for a in agents { w.string(a) }
    }
    public static func decode(from r: inout ByteReader) throws -> HubStatus {
        let volume = try VolumeInfo.decode(from: &r)
        let logical = try r.u64(), inodes = try r.u64(), chunks = try r.u64(), stored = try r.u64()
        let connected = try r.u32()
        let n = try r.count(max: 100_000)
        var agents: [String] = []
        for _ in 0..<n { agents.append(try r.string()) }
        return HubStatus(volume: volume, logicalBytes: logical, inodes: inodes, chunks: chunks, storedBytes: stored,
                         connectedAgents: connected, agents: agents)
    }
}

/// The result of a consistency check. `problems` is empty on a clean volume.
public struct FsckReport: Equatable, Sendable {
    public var inodesChecked: UInt64
    public var chunksChecked: UInt64
    public var problems: [String]
    public var repaired: [String]
    /// The problems still there when the check ended: every problem without `repair`; with it,
    /// what a metadata check after the repair finds, and the objects it could not check or
    /// write again (SPEC.md §11, `weft fsck`).
    /// Nil when the hub did not say: an older hub answering `fsck` (opcode 30), whose reply
    /// has no such field (SPEC.md §4, opcode 55).
    public var remaining: [String]?

    public init(inodesChecked: UInt64 = 0, chunksChecked: UInt64 = 0, problems: [String] = [], repaired: [String] = [],
                remaining: [String]? = nil) {
        self.inodesChecked = inodesChecked; self.chunksChecked = chunksChecked
        self.problems = problems; self.repaired = repaired; self.remaining = remaining
    }

    /// The problems to act on: `remaining`, or every problem where the hub did not say.
    public var unresolved: [String] { remaining ?? problems }

    /// Lines of one list a report carries over the wire, and their bytes: a reply must fit a
    /// frame (64 MiB) and a list the decoder's count bound (1,000,000).
    public static let wireLinesMax = 100_000
    public static let wireListBytesMax = 24 << 20

    static let cutMarker = "... and "

    /// How many lines `lines` stands for: a list cut for the wire counts the lines it left out,
    /// at its end, or per volume in a cluster hub's merged report (`merged`).
    public static func lineCount(_ lines: [String]) -> Int {
        lines.reduce(0) { $0 + (cutCount($1) ?? 1) }
    }

    /// The lines a cut marker stands for ("... and N more not listed", maybe after
    /// "volume ID: "), or nil for any other line.
    static func cutCount(_ line: String) -> Int? {
        guard let marker = line.range(of: cutMarker) else { return nil }
        // Nothing before the marker, or exactly "volume ID: " (a problem line that quotes a
        // file name containing the marker's words is no marker).
        let before = line[..<marker.lowerBound]
        if !before.isEmpty {
            guard before.hasPrefix("volume "), before.hasSuffix(": "),
                  before.dropFirst("volume ".count).dropLast(2).allSatisfy(\.isNumber),
                  before.count > "volume : ".count else { return nil }
        }
        let rest = line[marker.upperBound...]
        let digits = rest.prefix { $0.isNumber }
        guard let more = Int(digits), rest.dropFirst(digits.count).hasPrefix(" more not listed") else { return nil }
        return more
    }

    /// The report with each list cut to what the wire carries, a last line saying how many
    /// more there were (a volume that lost its metadata may hold millions of orphans).
    public func limitedForWire() -> FsckReport {
        limited(linesMax: Self.wireLinesMax, bytesMax: Self.wireListBytesMax)
    }

    /// Each list cut to `linesMax` lines and about `bytesMax` bytes, plus a marker line.
    func limited(linesMax: Int, bytesMax: Int) -> FsckReport {
        func cut(_ lines: [String]) -> [String] {
            var bytes = 0
            var kept = 0
            for line in lines {
                bytes += 4 + line.utf8.count
                guard kept < linesMax, bytes <= bytesMax else { break }
                kept += 1
            }
            guard kept < lines.count else { return lines }
            return Array(lines[..<kept]) + ["\(Self.cutMarker)\(lines.count - kept) more not listed (this reply lists \(kept))"]
        }
        return FsckReport(inodesChecked: inodesChecked, chunksChecked: chunksChecked, problems: cut(problems),
                          repaired: cut(repaired), remaining: remaining.map(cut))
    }

    /// One report for several volumes (a cluster hub's): counts added, every line prefixed
    /// with "volume ID: ". Each volume's lists are first cut to an equal share of what the wire
    /// carries, so that one volume with millions of lines does not crowd the others' out of the
    /// reply; `limitedForWire` then has nothing left to cut. `remaining` is always set (a
    /// volume that does not say counts every problem).
    public static func merged(_ volumes: [(id: String, report: FsckReport)],
                              linesMax: Int = wireLinesMax, bytesMax: Int = wireListBytesMax) -> FsckReport {
        let share = max(1, volumes.count)
        // Room for each volume's marker line and its prefixes (the longest volume name and a bit).
        let prefixBytes = 16 + (volumes.map(\.id.utf8.count).max() ?? 0)
        let linesEach = max(1, (linesMax - share) / share)
        let bytesEach = max(1, bytesMax / share - linesEach * prefixBytes - 256)
        var total = FsckReport(remaining: [])
        for (id, report) in volumes {
            var one = report
            one.remaining = report.unresolved
            one = one.limited(linesMax: linesEach, bytesMax: bytesEach)
            total.inodesChecked += one.inodesChecked
            total.chunksChecked += one.chunksChecked
            total.problems += one.problems.map { "volume \(id): \($0)" }
            total.repaired += one.repaired.map { "volume \(id): \($0)" }
            total.remaining! += one.unresolved.map { "volume \(id): \($0)" }
        }
        return total
    }

    /// The reply of opcode 30 (no `remaining`) or, `withRemaining`, of opcode 55: then a `u8`,
    /// 0 when every problem remains (also for nil: no second copy of a long list), 1 followed by
    /// the `remaining` list.
    public func encode(into w: inout ByteWriter, withRemaining: Bool = false) {
        w.u64(inodesChecked); w.u64(chunksChecked)
        w.u32(UInt32(problems.count)); for p in problems { w.string(p) }
        w.u32(UInt32(repaired.count)); for p in repaired { w.string(p) }
        if withRemaining {
            let remaining = unresolved
            if remaining == problems {
                w.u8(0)
            } else {
                w.u8(1)
                w.u32(UInt32(remaining.count)); for p in remaining { w.string(p) }
            }
        }
    }
    public static func decode(from r: inout ByteReader, withRemaining: Bool = false) throws -> FsckReport {
        var report = FsckReport(inodesChecked: try r.u64(), chunksChecked: try r.u64())
        for _ in 0..<(try r.count(max: 1_000_000)) { report.problems.append(try r.string()) }
        for _ in 0..<(try r.count(max: 1_000_000)) { report.repaired.append(try r.string()) }
        if withRemaining {
            switch try r.u8() {
            case 0:
                report.remaining = report.problems
            case 1:
                var remaining: [String] = []
                for _ in 0..<(try r.count(max: 1_000_000)) { remaining.append(try r.string()) }
                report.remaining = remaining
            default:
                throw WeftError.malformed
            }
        }
        return report
    }
}

/// Nanoseconds since the epoch, from the real-time clock.
public func currentTimeNs() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
}

// MARK: Locks

/// Which lock family: POSIX byte-range (fcntl) or whole-file flock.
public enum LockKind: UInt8, Sendable {
    case posix = 0
    case flock = 1
}

/// The lock type, with Linux's F_RDLCK / F_WRLCK / F_UNLCK values.
public enum LockType: UInt8, Sendable {
    case read = 0
    case write = 1
    case unlock = 2
}

/// One lock call (SPEC.md §12.6 Locks). Ranges are inclusive byte offsets; `end` UInt64.max
/// means "to the end of the file, however long it grows".
public struct LockRequest: Equatable, Sendable {
    public var kind: LockKind
    public var type: LockType
    public var start: UInt64
    public var end: UInt64
    /// The kernel's lock owner (per process for POSIX locks, per open file for flock).
    public var owner: UInt64
    public var pid: UInt32
    /// F_GETLK: only report the first conflicting lock, change nothing.
    public var test: Bool

    public init(kind: LockKind, type: LockType, start: UInt64 = 0, end: UInt64 = .max, owner: UInt64, pid: UInt32,
                test: Bool = false) {
        self.kind = kind; self.type = type; self.start = start; self.end = end
        self.owner = owner; self.pid = pid; self.test = test
    }

    public func encode(into w: inout ByteWriter) {
        w.u8(kind.rawValue); w.u8(type.rawValue); w.u64(start); w.u64(end); w.u64(owner); w.u32(pid); w.bool(test)
    }

    public static func decode(from r: inout ByteReader) throws -> LockRequest {
        let rawKind = try r.u8(), rawType = try r.u8()
        guard let kind = LockKind(rawValue: rawKind), let type = LockType(rawValue: rawType) else {
            throw WeftError(EBADMSG, "unknown lock kind \(rawKind) or type \(rawType)")
        }
        return LockRequest(kind: kind, type: type, start: try r.u64(), end: try r.u64(), owner: try r.u64(),
                           pid: try r.u32(), test: try r.bool())
    }
}

/// A lock as reported to F_GETLK: type `.unlock` means no conflict.
public struct LockDescription: Equatable, Sendable {
    public var type: LockType
    public var start: UInt64
    public var end: UInt64
    public var pid: UInt32

    public init(type: LockType, start: UInt64 = 0, end: UInt64 = 0, pid: UInt32 = 0) {
        self.type = type; self.start = start; self.end = end; self.pid = pid
    }

    public static let none = LockDescription(type: .unlock)

    public func encode(into w: inout ByteWriter) {
        w.u8(type.rawValue); w.u64(start); w.u64(end); w.u32(pid)
    }

    public static func decode(from r: inout ByteReader) throws -> LockDescription {
        let raw = try r.u8()
        guard let type = LockType(rawValue: raw) else { throw WeftError(EBADMSG, "unknown lock type \(raw)") }
        return LockDescription(type: type, start: try r.u64(), end: try r.u64(), pid: try r.u32())
    }
}
