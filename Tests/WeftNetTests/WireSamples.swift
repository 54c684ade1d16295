import WeftNet
import WeftProto
import WeftTestSupport

/// Non-trivial values for every request and every response shape.
enum WireSamples {
    static let context = RequestContext(session: 0xDEAD_BEEF_0042,
                                        credentials: Credentials(uid: 1000, gid: 100, groups: [4, 24, 27, 1_000_000]))
    static let name: [UInt8] = Array("héllo wörld.txt".utf8) + [0xFF, 0x00, 0x7F]
    static let otherName: [UInt8] = Array(repeating: 0x61, count: 255)
    static let attributes = Attributes(ino: 0x0123_4567_89AB_CDEF, mode: 0o100755, nlink: 3, uid: 1000, gid: 100,
                                       rdev: 0x0803, size: 1 << 45, atimeNs: -1, mtimeNs: 1_700_000_000_000_000_001,
                                       ctimeNs: Int64.max, dataVersion: UInt64.max - 1)
    static let volume = VolumeInfo(formatVersion: 3, uuid: Array(200..<216), chunkSizeBytes: 64 << 20,
                                   compression: .zstd, createdNs: 1_600_000_000_000_000_000)
    static let slices = [
        SliceCommit(chunkIndex: 0, slice: Slice(id: 77, offsetInChunk: 0, length: 4096, sliceOffset: 0, objectLength: 4096)),
        SliceCommit(chunkIndex: 9, slice: Slice(id: 0, offsetInChunk: 123, length: 1 << 20, sliceOffset: 5, objectLength: 0)),
        SliceCommit(chunkIndex: UInt32.max, slice: Slice(id: UInt64.max, offsetInChunk: UInt32.max, length: 1,
                                                         sliceOffset: 17, objectLength: UInt32.max, hub: UInt16.max)),
        SliceCommit(chunkIndex: 3, slice: Slice(id: 5 << 48 | 9, offsetInChunk: 0, length: 10, objectLength: 10, hub: 2)),
    ]
    static let data: [UInt8] = (0..<70_000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }

    /// One request per opcode.
    static let requests: [HubRequest] = [
        .openSession(agentName: "node-7.rack-3 ✓"),
        .closeSession(0xFFFF_FFFF_FFFF_FFF0),
        .lookup(context, parent: 1, name: name),
        .getattr(context, ino: 0x8000_0000_0000_0001),
        .setattr(context, ino: 42, SetAttributes(mode: 0o4755, uid: nil, gid: 0, size: 1 << 40,
                                                 atime: .now, mtime: .nanoseconds(-123_456_789))),
        .create(context, parent: 2, name: name, mode: 0o020644, rdev: 0x0103, umask: 0o022, exclusive: true),
        .mkdir(context, parent: 3, name: otherName, mode: 0o1777, umask: 0o077),
        .unlink(context, parent: 4, name: name),
        .rmdir(context, parent: 5, name: [0x2E, 0x2E, 0x2E]),
        .symlink(context, parent: 6, name: name, target: Array(repeating: 0x2F, count: 4095)),
        .readlink(context, ino: 7),
        .link(context, ino: 8, newParent: 9, newName: otherName),
        .rename(context, parent: 10, name: name, newParent: 11, newName: otherName, flags: [.noReplace, .exchange]),
        .readdir(context, ino: 12, after: Array("entry42".utf8), limit: 4096),
        .access(context, ino: 13, mask: 7),
        .open(context, ino: 14, flags: Int32(bitPattern: 0x8000_0241)),
        .release(context, ino: 15),
        .getxattr(context, ino: 16, name: Array("user.mime_type".utf8)),
        .setxattr(context, ino: 17, name: Array("trusted.x".utf8), value: Array(data.prefix(65536)), flags: .replace),
        .listxattr(context, ino: 18),
        .removexattr(context, ino: 19, name: Array("security.selinux".utf8)),
        .statfs(context),
        .allocateSliceIDs(context, count: 1 << 20),
        .writeSlice(context, id: 0xABCD_EF01_2345, data: data),
        .writeObject(context, id: 0xABCD_EF01_2346, image: Array(data.prefix(70_000))),
        .readSlice(context, id: 99, offset: 4 << 20, length: 64 << 20),
        .layout(context, ino: 20, firstChunk: 1 << 30, count: 17),
        .commitSlices(context, ino: 21, slices: slices, minimumSize: 0x0003_FFFF_FFFF_FFFF, durable: true),
        .sync(context),
        .barrier(context, ino: 0x0123_4567_89AB_CDEF),
        .syncFile(context, ino: 0x0FED_CBA9_8765_4321),
        .openLayout(context, ino: 0x0BAD_F00D_0000_0001, flags: Int32(bitPattern: 0x8000_8002), chunkCount: 64,
                    dataMaxBytes: 0xFFFF_FFFF),
        .status,
        .fsck(repair: true),
        .fsckRemaining(repair: true),
        .openVolumeSession(agentName: "node-8", volume: "datasets ✓"),
        .clusterMap,
        .localReads,
        .createVolume(name: "ckpt", home: "hub-b", chunkSizeBytes: 8 << 20, compression: .zstd),
        .lock(context, ino: 22, LockRequest(kind: .posix, type: .write, start: 1 << 40, end: .max, owner: 0xFEED_BEEF,
                                            pid: 4_000_000, test: true)),
        .ping,
        .fence(client: 0xFEED_FACE_CAFE_BEEF, connection: 3),
        .enableLeases(0xABCD),
        .recall(session: 77, ino: 1 << 50 | 9, names: [Array("a".utf8), [], Array(repeating: 0x61, count: 255)], notice: false),
        .recall(session: 1, ino: 2, names: [], notice: true),
        .acquireWriteLease(context, ino: 42),
        .reclaimWriteLease(context, ino: 1 << 48 | 42),
        .openDataSession(agentName: "node-9", volume: "v ✓"),
        .readSliceFrom(context, id: 3 << 48 | 1, offset: 65536, length: 1 << 20, holders: [2, 0, 65535]),
        .fetchObject(id: UInt64.max, offset: 8 << 20, length: 8 << 20),
        .releaseUploads(context, ids: [1, 2 << 48 | 3, UInt64.max]),
        .discardUploads(context, ids: [7, 3 << 48 | 1, UInt64.max - 1]),
        .releaseMany(context, inos: [42, 42, 1 << 48 | 7]),
        .readBlocks(context, id: 3 << 48 | 9, firstBlock: 17, count: 1024),
        .deleteObjects(ids: [2 << 48 | 1, UInt64.max]),
        .unlinkEntry(context, parent: 24, name: otherName),
        .createOpen(context, parent: 23, name: name, mode: 0o100600, umask: 0o027, flags: Int32(bitPattern: 0x8000_00C2),
                    writeLease: true),
        .adoptObject(context, id: 1 << 40 | 0xAB, tag: 0x8000_0001),
    ]

    /// Variants that exercise optional and empty fields.
    static let edgeRequests: [HubRequest] = [
        .openSession(agentName: ""),
        .readdir(RequestContext(session: 0, credentials: .root), ino: 1, after: nil, limit: 0),
        .readdir(context, ino: 1, after: [], limit: UInt32.max),
        .setattr(context, ino: 1, SetAttributes()),
        .commitSlices(context, ino: 1, slices: [], minimumSize: 0, durable: false),
        .writeSlice(context, id: 1, data: []),
        .writeObject(context, id: 1, image: []),
        .fsck(repair: false),
        .fsckRemaining(repair: false),
        .lookup(context, parent: 0, name: []),
        .readSliceFrom(context, id: 1, offset: 0, length: 0, holders: []),
        .releaseUploads(context, ids: []),
        .discardUploads(context, ids: []),
        .releaseMany(context, inos: []),
        .readBlocks(RequestContext(session: 0, credentials: .root), id: 0, firstBlock: 0, count: 0),
        .deleteObjects(ids: []),
        .createOpen(RequestContext(session: 0, credentials: .root), parent: 0, name: [], mode: 0, umask: 0, flags: 0,
                    writeLease: false),
    ]

    static let status = HubStatus(volume: volume, logicalBytes: 1 << 50, inodes: 1_000_000, chunks: 55, storedBytes: 1 << 33,
                                  connectedAgents: 3, agents: ["a", "node-β", String(repeating: "x", count: 4096)])

    /// Opcodes whose success result is a `HubResponse` (readBlocks has a codec of its own,
    /// `StoredBlocksCodecTests`).
    static let valueOpcodes = HubOpcode.allCases.filter { $0 != .readBlocks }

    /// One success result per opcode of `valueOpcodes`.
    static func response(for opcode: HubOpcode) -> HubResponse {
        switch opcode {
        case .readBlocks:
            preconditionFailure("readBlocks has no HubResponse")
        case .closeSession, .unlink, .rmdir, .rename, .access, .release, .setxattr, .removexattr, .writeSlice, .writeObject, .sync, .ping, .fence,
             .enableLeases, .recall, .releaseUploads, .deleteObjects, .discardUploads, .releaseMany, .barrier, .syncFile, .adoptObject:
            return .empty
        case .acquireWriteLease, .reclaimWriteLease:
            return .flag(true)
        case .fetchObject:
            return .objectPart(fileBytes: 12_345_678, Array(data.prefix(4096)))
        case .createOpen:
            var directory = attributes
            directory.mode = 0o040755
            return .created(CreatedFile(attributes: attributes, parent: directory, writeLeased: true))
        case .openSession, .openVolumeSession, .openDataSession:
            return .session(0x1234_5678_9ABC, volume)
        case .lock:
            return .lock(LockDescription(type: .read, start: 7, end: UInt64.max - 1, pid: UInt32.max))
        case .clusterMap, .createVolume:
            return .bytes(Array("{\"cluster\":\"weft\"}".utf8))
        case .localReads:
            var offer = ByteWriter()
            offer.string(LocalReadServer.namePrefix + "00ff")
            offer.string("127.0.0.1:40000")
            return .bytes(offer.bytes)
        case .unlinkEntry:
            var directory = attributes
            directory.mode = 0o040700
            return .unlinked(directory)
        case .lookup, .getattr, .setattr, .create, .mkdir, .symlink, .link, .open, .commitSlices:
            var varied = attributes
            varied.ino = UInt64(opcode.rawValue) << 40
            return .attributes(varied)
        case .readlink, .getxattr, .readSlice, .readSliceFrom:
            return .bytes(opcode == .readSlice || opcode == .readSliceFrom ? data : Array(name.reversed()))
        case .readdir:
            return .entries((0..<37).map { index in
                var entryAttributes = attributes
                entryAttributes.ino = UInt64(index) + 1
                return DirectoryEntry(name: index == 0 ? [0x2E] : Array("file-\(index)".utf8), ino: UInt64(index) + 1,
                                      attributes: entryAttributes)
            })
        case .listxattr:
            return .names([Array("user.a".utf8), [], otherName])
        case .statfs:
            return .fileSystemStats(FileSystemStats(blockSizeBytes: 65536, totalBlocks: UInt64.max, freeBlocks: 1,
                                                    totalInodes: 1 << 60, freeInodes: 0, nameMaxBytes: 255))
        case .allocateSliceIDs:
            return .firstSliceID(0xFEED_FACE_CAFE)
        case .layout:
            return .layout(attributes, [[], slices.map(\.slice), [slices[0].slice], []])
        case .openLayout:
            return .openedLayout(OpenedLayout(attributes: attributes, chunks: [[slices[0].slice], []], data: Array(data.prefix(65536))))
        case .status:
            return .status(status)
        case .fsck:
            return .fsckReport(FsckReport(inodesChecked: 1 << 35, chunksChecked: 3, problems: ["chunk 7: checksum mismatch", ""],
                                          repaired: ["chunk 7 dropped"]))
        case .fsckRemaining:
            return .fsckResult(FsckReport(inodesChecked: 1 << 35, chunksChecked: 3, problems: ["chunk 7: checksum mismatch", "κ"],
                                          repaired: [], remaining: ["κ", "", "chunk 7: checksum mismatch"]))
        }
    }

    /// Empty-ish success results per shape.
    static let edgeResponses: [(HubOpcode, HubResponse)] = [
        (.readdir, .entries([])),
        (.listxattr, .names([])),
        (.readSlice, .bytes([])),
        (.layout, .layout(attributes, [])),
        (.openLayout, .openedLayout(OpenedLayout(attributes: attributes, chunks: [], data: []))),
        (.status, .status(HubStatus(volume: volume, logicalBytes: 0, inodes: 0, chunks: 0, storedBytes: 0,
                                    connectedAgents: 0, agents: []))),
        (.fsck, .fsckReport(FsckReport())),
        (.fsckRemaining, .fsckResult(FsckReport(remaining: []))),
        (.unlinkEntry, .unlinked(nil)),
        (.createOpen, .created(CreatedFile(attributes: attributes, parent: nil, writeLeased: false))),
    ]
}

/// SplitMix64: a small, seedable generator so that a failing seed replays exactly.
typealias SeededGenerator = SeededRandom
