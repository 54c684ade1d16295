#if canImport(Glibc)
import Glibc
#endif
import WeftProto

/// One opcode per `HubAPI` method. Values are part of the wire format: never renumber one;
/// a new method gets the next free value.
public enum HubOpcode: UInt16, Sendable, CaseIterable, CustomStringConvertible {
    case openSession = 1
    case closeSession = 2
    case lookup = 3
    case getattr = 4
    case setattr = 5
    case create = 6
    case mkdir = 7
    case unlink = 8
    case rmdir = 9
    case symlink = 10
    case readlink = 11
    case link = 12
    case rename = 13
    case readdir = 14
    case access = 15
    case open = 16
    case release = 17
    case getxattr = 18
    case setxattr = 19
    case listxattr = 20
    case removexattr = 21
    case statfs = 22
    case allocateSliceIDs = 23
    case writeSlice = 24
    case readSlice = 25
    case layout = 26
    case commitSlices = 27
    case sync = 28
    case status = 29
    case fsck = 30
    case openVolumeSession = 31
    case clusterMap = 32
    case createVolume = 33
    case lock = 34
    case ping = 35
    case enableLeases = 36
    case recall = 37
    case acquireWriteLease = 38
    case reclaimWriteLease = 39
    case openDataSession = 40
    case readSliceFrom = 41
    case fetchObject = 42
    case releaseUploads = 43
    case deleteObjects = 44
    case createOpen = 45
    case unlinkEntry = 46
    case discardUploads = 47
    case releaseMany = 48
    case readBlocks = 49
    case barrier = 50
    case fence = 51
    case syncFile = 52
    case openLayout = 53
    case writeObject = 54
    case fsckRemaining = 55
    case localReads = 56
    case adoptObject = 57

    public var description: String { "\(name)(\(rawValue))" }

    var name: String {
        switch self {
        case .openSession: "openSession"
        case .closeSession: "closeSession"
        case .lookup: "lookup"
        case .getattr: "getattr"
        case .setattr: "setattr"
        case .create: "create"
        case .mkdir: "mkdir"
        case .unlink: "unlink"
        case .rmdir: "rmdir"
        case .symlink: "symlink"
        case .readlink: "readlink"
        case .link: "link"
        case .rename: "rename"
        case .readdir: "readdir"
        case .access: "access"
        case .open: "open"
        case .release: "release"
        case .getxattr: "getxattr"
        case .setxattr: "setxattr"
        case .listxattr: "listxattr"
        case .removexattr: "removexattr"
        case .statfs: "statfs"
        case .allocateSliceIDs: "allocateSliceIDs"
        case .writeSlice: "writeSlice"
        case .writeObject: "writeObject"
        case .readSlice: "readSlice"
        case .layout: "layout"
        case .commitSlices: "commitSlices"
        case .sync: "sync"
        case .barrier: "barrier"
        case .syncFile: "syncFile"
        case .openLayout: "openLayout"
        case .fence: "fence"
        case .status: "status"
        case .fsck: "fsck"
        case .fsckRemaining: "fsckRemaining"
        case .openVolumeSession: "openVolumeSession"
        case .clusterMap: "clusterMap"
        case .localReads: "localReads"
        case .adoptObject: "adoptObject"
        case .createVolume: "createVolume"
        case .lock: "lock"
        case .ping: "ping"
        case .enableLeases: "enableLeases"
        case .recall: "recall"
        case .acquireWriteLease: "acquireWriteLease"
        case .reclaimWriteLease: "reclaimWriteLease"
        case .openDataSession: "openDataSession"
        case .readSliceFrom: "readSliceFrom"
        case .fetchObject: "fetchObject"
        case .releaseUploads: "releaseUploads"
        case .discardUploads: "discardUploads"
        case .releaseMany: "releaseMany"
        case .readBlocks: "readBlocks"
        case .deleteObjects: "deleteObjects"
        case .createOpen: "createOpen"
        case .unlinkEntry: "unlinkEntry"
        }
    }
}

/// The arguments of one `HubAPI` call, as they travel on the wire. The `RequestContext` comes
/// first in the payload of every method that has one.
public enum HubRequest: Equatable, Sendable {
    case openSession(agentName: String)
    case closeSession(SessionID)
    case lookup(RequestContext, parent: InodeID, name: [UInt8])
    case getattr(RequestContext, ino: InodeID)
    case setattr(RequestContext, ino: InodeID, SetAttributes)
    case create(RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, rdev: UInt32, umask: UInt32, exclusive: Bool)
    case mkdir(RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32)
    case unlink(RequestContext, parent: InodeID, name: [UInt8])
    case rmdir(RequestContext, parent: InodeID, name: [UInt8])
    case symlink(RequestContext, parent: InodeID, name: [UInt8], target: [UInt8])
    case readlink(RequestContext, ino: InodeID)
    case link(RequestContext, ino: InodeID, newParent: InodeID, newName: [UInt8])
    case rename(RequestContext, parent: InodeID, name: [UInt8], newParent: InodeID, newName: [UInt8], flags: RenameFlags)
    case readdir(RequestContext, ino: InodeID, after: [UInt8]?, limit: UInt32)
    case access(RequestContext, ino: InodeID, mask: UInt32)
    case open(RequestContext, ino: InodeID, flags: Int32)
    case release(RequestContext, ino: InodeID)
    case getxattr(RequestContext, ino: InodeID, name: [UInt8])
    case setxattr(RequestContext, ino: InodeID, name: [UInt8], value: [UInt8], flags: XattrFlags)
    case listxattr(RequestContext, ino: InodeID)
    case removexattr(RequestContext, ino: InodeID, name: [UInt8])
    case statfs(RequestContext)
    case allocateSliceIDs(RequestContext, count: UInt32)
    case writeSlice(RequestContext, id: SliceID, data: [UInt8])
    /// `writeSlice` of an object sent as its compressed stored image (SPEC.md §4, Compressed uploads).
    case writeObject(RequestContext, id: SliceID, image: [UInt8])
    case readSlice(RequestContext, id: SliceID, offset: UInt32, length: UInt32)
    case layout(RequestContext, ino: InodeID, firstChunk: UInt32, count: UInt32)
    case commitSlices(RequestContext, ino: InodeID, slices: [SliceCommit], minimumSize: UInt64, durable: Bool)
    case sync(RequestContext)
    /// Answers once every commit of `ino` by this agent that the hub read before it has
    /// finished (SPEC.md §4, Barriers).
    case barrier(RequestContext, ino: InodeID)
    case syncFile(RequestContext, ino: InodeID)
    /// Takes over the object a co-located agent wrote under `tag` (SPEC.md §4, Co-located writes).
    case adoptObject(RequestContext, id: SliceID, tag: UInt32)
    /// `open` (no `O_TRUNC`) and `layout` of chunks `[0, chunkCount)` in one call, with a
    /// whole small object's bytes up to `dataMaxBytes`.
    case openLayout(RequestContext, ino: InodeID, flags: Int32, chunkCount: UInt32, dataMaxBytes: UInt32)
    case status
    case fsck(repair: Bool)
    /// `fsck`, whose reply also lists the problems still there when it ended (SPEC.md §4).
    case fsckRemaining(repair: Bool)
    case openVolumeSession(agentName: String, volume: String)
    case clusterMap
    /// Where a co-located agent may read the store itself (SPEC.md §4, Co-located reads).
    case localReads
    case createVolume(name: String, home: String, chunkSizeBytes: UInt32, compression: Compression)
    case lock(RequestContext, ino: InodeID, LockRequest)
    /// Keeps an idle connection (and so its sessions) alive; answered by the server itself.
    case ping
    /// The first request on each connection of a client (one `RemoteHub`): connection `connection`
    /// (counting up from 1) of client `client` replaces every earlier one, whose requests not yet
    /// started never run; answered by the server itself (SPEC.md §4, Fences).
    case fence(client: UInt64, connection: UInt64)
    /// The session's agent takes leases and answers recalls on this connection.
    case enableLeases(SessionID)
    /// Hub to agent (a `callback` frame): give up the lease on `ino` (SPEC.md §12.6).
    case recall(session: SessionID, ino: InodeID, names: [[UInt8]], notice: Bool)
    case acquireWriteLease(RequestContext, ino: InodeID)
    case reclaimWriteLease(RequestContext, ino: InodeID)
    /// A data-only session on a volume homed at another hub (SPEC.md §12.5).
    case openDataSession(agentName: String, volume: String)
    /// `readSlice` naming the hubs that hold the object (read-through cache).
    case readSliceFrom(RequestContext, id: SliceID, offset: UInt32, length: UInt32, holders: [UInt16])
    /// Hub to hub: raw bytes of a stored object file, for a read-through copy.
    case fetchObject(id: SliceID, offset: UInt32, length: UInt32)
    /// The objects are committed at the home: the data hub stops tracking them as uploads.
    case releaseUploads(RequestContext, ids: [SliceID])
    case discardUploads(RequestContext, ids: [SliceID])
    /// `release` of each inode, in one call (an inode named twice is released twice).
    case releaseMany(RequestContext, inos: [InodeID])
    /// Stored blocks of an object, unverified, for the reader to check (SPEC.md §4, Stored-block reads).
    case readBlocks(RequestContext, id: SliceID, firstBlock: UInt32, count: UInt32)
    /// Home to holder hub: the objects are garbage at their volume's home; delete every copy.
    case deleteObjects(ids: [SliceID])
    /// unlink, answered with the parent's attributes after it.
    case unlinkEntry(RequestContext, parent: InodeID, name: [UInt8])
    /// create + open + write lease of a new regular file in one call.
    case createOpen(RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32, flags: Int32,
                    writeLease: Bool)

    public var opcode: HubOpcode {
        switch self {
        case .openSession: .openSession
        case .closeSession: .closeSession
        case .lookup: .lookup
        case .getattr: .getattr
        case .setattr: .setattr
        case .create: .create
        case .mkdir: .mkdir
        case .unlink: .unlink
        case .rmdir: .rmdir
        case .symlink: .symlink
        case .readlink: .readlink
        case .link: .link
        case .rename: .rename
        case .readdir: .readdir
        case .access: .access
        case .open: .open
        case .release: .release
        case .getxattr: .getxattr
        case .setxattr: .setxattr
        case .listxattr: .listxattr
        case .removexattr: .removexattr
        case .statfs: .statfs
        case .allocateSliceIDs: .allocateSliceIDs
        case .writeSlice: .writeSlice
        case .writeObject: .writeObject
        case .readSlice: .readSlice
        case .layout: .layout
        case .commitSlices: .commitSlices
        case .sync: .sync
        case .barrier: .barrier
        case .syncFile: .syncFile
        case .adoptObject: .adoptObject
        case .openLayout: .openLayout
        case .status: .status
        case .fsck: .fsck
        case .fsckRemaining: .fsckRemaining
        case .openVolumeSession: .openVolumeSession
        case .clusterMap: .clusterMap
        case .localReads: .localReads
        case .createVolume: .createVolume
        case .lock: .lock
        case .ping: .ping
        case .fence: .fence
        case .enableLeases: .enableLeases
        case .recall: .recall
        case .acquireWriteLease: .acquireWriteLease
        case .reclaimWriteLease: .reclaimWriteLease
        case .openDataSession: .openDataSession
        case .readSliceFrom: .readSliceFrom
        case .fetchObject: .fetchObject
        case .releaseUploads: .releaseUploads
        case .discardUploads: .discardUploads
        case .releaseMany: .releaseMany
        case .readBlocks: .readBlocks
        case .deleteObjects: .deleteObjects
        case .createOpen: .createOpen
        case .unlinkEntry: .unlinkEntry
        }
    }

    /// The session the request acts for: its context's, or the one `closeSession` ends.
    public var session: SessionID? {
        switch self {
        case .openSession, .status, .fsck, .fsckRemaining, .openVolumeSession, .clusterMap, .localReads, .createVolume, .ping, .fence, .openDataSession,
             .fetchObject, .deleteObjects: nil
        case .closeSession(let session), .enableLeases(let session), .recall(let session, _, _, _): session
        case .acquireWriteLease(let c, _), .reclaimWriteLease(let c, _): c.session
        case .lookup(let c, _, _), .getattr(let c, _), .setattr(let c, _, _), .create(let c, _, _, _, _, _, _),
             .mkdir(let c, _, _, _, _), .unlink(let c, _, _), .rmdir(let c, _, _), .symlink(let c, _, _, _),
             .readlink(let c, _), .link(let c, _, _, _), .rename(let c, _, _, _, _, _), .readdir(let c, _, _, _),
             .access(let c, _, _), .open(let c, _, _), .release(let c, _), .getxattr(let c, _, _),
             .setxattr(let c, _, _, _, _), .listxattr(let c, _), .removexattr(let c, _, _), .statfs(let c),
             .allocateSliceIDs(let c, _), .writeSlice(let c, _, _), .writeObject(let c, _, _), .readSlice(let c, _, _, _),
             .layout(let c, _, _, _), .commitSlices(let c, _, _, _, _), .sync(let c), .barrier(let c, _), .syncFile(let c, _), .lock(let c, _, _),
             .openLayout(let c, _, _, _, _), .adoptObject(let c, _, _),
             .readSliceFrom(let c, _, _, _, _), .releaseUploads(let c, _), .createOpen(let c, _, _, _, _, _, _),
             .unlinkEntry(let c, _, _), .discardUploads(let c, _), .releaseMany(let c, _), .readBlocks(let c, _, _, _):
            c.session
        }
    }

    /// The same request acting for `session` instead (a reconnected client's live session id).
    public func withSession(_ session: SessionID) -> HubRequest {
        func s(_ context: RequestContext) -> RequestContext {
            var context = context
            context.session = session
            return context
        }
        switch self {
        case .openSession, .status, .fsck, .fsckRemaining, .openVolumeSession, .clusterMap, .localReads, .createVolume, .ping, .fence, .openDataSession,
             .fetchObject, .deleteObjects: return self
        case .closeSession: return .closeSession(session)
        case .enableLeases: return .enableLeases(session)
        case let .recall(_, ino, names, notice): return .recall(session: session, ino: ino, names: names, notice: notice)
        case let .acquireWriteLease(c, ino): return .acquireWriteLease(s(c), ino: ino)
        case let .reclaimWriteLease(c, ino): return .reclaimWriteLease(s(c), ino: ino)
        case let .lookup(c, parent, name): return .lookup(s(c), parent: parent, name: name)
        case let .getattr(c, ino): return .getattr(s(c), ino: ino)
        case let .setattr(c, ino, changes): return .setattr(s(c), ino: ino, changes)
        case let .create(c, parent, name, mode, rdev, umask, exclusive):
            return .create(s(c), parent: parent, name: name, mode: mode, rdev: rdev, umask: umask, exclusive: exclusive)
        case let .createOpen(c, parent, name, mode, umask, flags, writeLease):
            return .createOpen(s(c), parent: parent, name: name, mode: mode, umask: umask, flags: flags,
                               writeLease: writeLease)
        case let .mkdir(c, parent, name, mode, umask): return .mkdir(s(c), parent: parent, name: name, mode: mode, umask: umask)
        case let .unlink(c, parent, name): return .unlink(s(c), parent: parent, name: name)
        case let .unlinkEntry(c, parent, name): return .unlinkEntry(s(c), parent: parent, name: name)
        case let .rmdir(c, parent, name): return .rmdir(s(c), parent: parent, name: name)
        case let .symlink(c, parent, name, target): return .symlink(s(c), parent: parent, name: name, target: target)
        case let .readlink(c, ino): return .readlink(s(c), ino: ino)
        case let .link(c, ino, newParent, newName): return .link(s(c), ino: ino, newParent: newParent, newName: newName)
        case let .rename(c, parent, name, newParent, newName, flags):
            return .rename(s(c), parent: parent, name: name, newParent: newParent, newName: newName, flags: flags)
        case let .readdir(c, ino, after, limit): return .readdir(s(c), ino: ino, after: after, limit: limit)
        case let .access(c, ino, mask): return .access(s(c), ino: ino, mask: mask)
        case let .open(c, ino, flags): return .open(s(c), ino: ino, flags: flags)
        case let .release(c, ino): return .release(s(c), ino: ino)
        case let .getxattr(c, ino, name): return .getxattr(s(c), ino: ino, name: name)
        case let .setxattr(c, ino, name, value, flags): return .setxattr(s(c), ino: ino, name: name, value: value, flags: flags)
        case let .listxattr(c, ino): return .listxattr(s(c), ino: ino)
        case let .removexattr(c, ino, name): return .removexattr(s(c), ino: ino, name: name)
        case let .statfs(c): return .statfs(s(c))
        case let .allocateSliceIDs(c, count): return .allocateSliceIDs(s(c), count: count)
        case let .writeSlice(c, id, data): return .writeSlice(s(c), id: id, data: data)
        case let .writeObject(c, id, image): return .writeObject(s(c), id: id, image: image)
        case let .readSlice(c, id, offset, length): return .readSlice(s(c), id: id, offset: offset, length: length)
        case let .layout(c, ino, firstChunk, count): return .layout(s(c), ino: ino, firstChunk: firstChunk, count: count)
        case let .commitSlices(c, ino, slices, minimumSize, durable):
            return .commitSlices(s(c), ino: ino, slices: slices, minimumSize: minimumSize, durable: durable)
        case let .sync(c): return .sync(s(c))
        case let .barrier(c, ino): return .barrier(s(c), ino: ino)
        case let .syncFile(c, ino): return .syncFile(s(c), ino: ino)
        case let .adoptObject(c, id, tag): return .adoptObject(s(c), id: id, tag: tag)
        case let .openLayout(c, ino, flags, chunkCount, dataMaxBytes):
            return .openLayout(s(c), ino: ino, flags: flags, chunkCount: chunkCount, dataMaxBytes: dataMaxBytes)
        case let .lock(c, ino, request): return .lock(s(c), ino: ino, request)
        case let .readSliceFrom(c, id, offset, length, holders):
            return .readSliceFrom(s(c), id: id, offset: offset, length: length, holders: holders)
        case let .releaseUploads(c, ids): return .releaseUploads(s(c), ids: ids)
        case let .discardUploads(c, ids): return .discardUploads(s(c), ids: ids)
        case let .releaseMany(c, inos): return .releaseMany(s(c), inos: inos)
        case let .readBlocks(c, id, firstBlock, count): return .readBlocks(s(c), id: id, firstBlock: firstBlock, count: count)
        }
    }

    /// Writes the payload into `w`, except for a trailing bulk byte string (`writeSlice`'s data),
    /// whose u32 length prefix is written and whose bytes are returned for the caller to append
    /// as they are. Large data is thus copied once, straight into the outgoing frame.
    func encodeHead(into w: inout ByteWriter) -> [UInt8]? {
        switch self {
        case let .openSession(agentName):
            w.string(agentName)
        case let .closeSession(session):
            w.u64(session)
        case let .lookup(c, parent, name), let .unlink(c, parent, name), let .rmdir(c, parent, name),
             let .unlinkEntry(c, parent, name):
            c.encode(into: &w); w.u64(parent); w.blob(name)
        case let .getattr(c, ino), let .readlink(c, ino), let .release(c, ino), let .listxattr(c, ino):
            c.encode(into: &w); w.u64(ino)
        case let .setattr(c, ino, changes):
            c.encode(into: &w); w.u64(ino); changes.encode(into: &w)
        case let .create(c, parent, name, mode, rdev, umask, exclusive):
            c.encode(into: &w); w.u64(parent); w.blob(name); w.u32(mode); w.u32(rdev); w.u32(umask); w.bool(exclusive)
        case let .createOpen(c, parent, name, mode, umask, flags, writeLease):
            c.encode(into: &w); w.u64(parent); w.blob(name); w.u32(mode); w.u32(umask); w.i32(flags); w.bool(writeLease)
        case let .mkdir(c, parent, name, mode, umask):
            c.encode(into: &w); w.u64(parent); w.blob(name); w.u32(mode); w.u32(umask)
        case let .symlink(c, parent, name, target):
            c.encode(into: &w); w.u64(parent); w.blob(name); w.blob(target)
        case let .link(c, ino, newParent, newName):
            c.encode(into: &w); w.u64(ino); w.u64(newParent); w.blob(newName)
        case let .rename(c, parent, name, newParent, newName, flags):
            c.encode(into: &w); w.u64(parent); w.blob(name); w.u64(newParent); w.blob(newName); w.u32(flags.rawValue)
        case let .readdir(c, ino, after, limit):
            c.encode(into: &w); w.u64(ino)
            if let after { w.u8(1); w.blob(after) } else { w.u8(0) }
            w.u32(limit)
        case let .access(c, ino, mask):
            c.encode(into: &w); w.u64(ino); w.u32(mask)
        case let .open(c, ino, flags):
            c.encode(into: &w); w.u64(ino); w.i32(flags)
        case let .openLayout(c, ino, flags, chunkCount, dataMaxBytes):
            c.encode(into: &w); w.u64(ino); w.i32(flags); w.u32(chunkCount); w.u32(dataMaxBytes)
        case let .getxattr(c, ino, name), let .removexattr(c, ino, name):
            c.encode(into: &w); w.u64(ino); w.blob(name)
        case let .setxattr(c, ino, name, value, flags):
            c.encode(into: &w); w.u64(ino); w.blob(name); w.blob(value); w.u32(flags.rawValue)
        case let .statfs(c), let .sync(c):
            c.encode(into: &w)
        case let .barrier(c, ino), let .syncFile(c, ino):
            c.encode(into: &w); w.u64(ino)
        case let .adoptObject(c, id, tag):
            c.encode(into: &w); w.u64(id); w.u32(tag)
        case let .allocateSliceIDs(c, count):
            c.encode(into: &w); w.u32(count)
        case let .writeSlice(c, id, data), let .writeObject(c, id, data):
            Self.encodeWriteSliceHead(c, id: id, count: data.count, into: &w)
            return data
        case let .readSlice(c, id, offset, length):
            c.encode(into: &w); w.u64(id); w.u32(offset); w.u32(length)
        case let .readBlocks(c, id, firstBlock, count):
            c.encode(into: &w); w.u64(id); w.u32(firstBlock); w.u32(count)
        case let .layout(c, ino, firstChunk, count):
            c.encode(into: &w); w.u64(ino); w.u32(firstChunk); w.u32(count)
        case let .commitSlices(c, ino, slices, minimumSize, durable):
            c.encode(into: &w); w.u64(ino); w.u32(UInt32(slices.count))
            for commit in slices { w.u32(commit.chunkIndex); commit.slice.encode(into: &w) }
            w.u64(minimumSize); w.bool(durable)
        case .status:
            break
        case let .fsck(repair), let .fsckRemaining(repair):
            w.bool(repair)
        case let .openVolumeSession(agentName, volume):
            w.string(agentName); w.string(volume)
        case .clusterMap, .localReads:
            break
        case let .createVolume(name, home, chunkSizeBytes, compression):
            w.string(name); w.string(home); w.u32(chunkSizeBytes); w.u8(compression.rawValue)
        case let .lock(c, ino, request):
            c.encode(into: &w); w.u64(ino); request.encode(into: &w)
        case .ping:
            break
        case let .fence(client, connection):
            w.u64(client); w.u64(connection)
        case let .enableLeases(session):
            w.u64(session)
        case let .recall(session, ino, names, notice):
            w.u64(session); w.u64(ino); w.bool(notice); w.u32(UInt32(names.count))
            for name in names { w.blob(name) }
        case let .acquireWriteLease(c, ino), let .reclaimWriteLease(c, ino):
            c.encode(into: &w); w.u64(ino)
        case let .openDataSession(agentName, volume):
            w.string(agentName); w.string(volume)
        case let .readSliceFrom(c, id, offset, length, holders):
            c.encode(into: &w); w.u64(id); w.u32(offset); w.u32(length); w.u32(UInt32(holders.count))
            for holder in holders { w.u16(holder) }
        case let .fetchObject(id, offset, length):
            w.u64(id); w.u32(offset); w.u32(length)
        case let .deleteObjects(ids):
            w.u32(UInt32(ids.count))
            for id in ids { w.u64(id) }
        case let .releaseUploads(c, ids), let .discardUploads(c, ids), let .releaseMany(c, ids):
            c.encode(into: &w); w.u32(UInt32(ids.count))
            for id in ids { w.u64(id) }
        }
        return nil
    }

    /// Reads the payload of a request with `opcode`. Leaves any trailing bytes to the caller.
    /// A writeSlice payload up to its data; the data's bytes follow (SPEC.md §4, Bulk transfers:
    /// both ends move them without building an array).
    static func encodeWriteSliceHead(_ c: RequestContext, id: SliceID, count: Int, into w: inout ByteWriter) {
        c.encode(into: &w); w.u64(id); w.u32(UInt32(count))
    }

    /// The rest of a writeSlice payload after its context: the slice id and a view of the data.
    static func decodeWriteSliceTail(from r: inout ByteReader) throws -> (SliceID, UnsafeRawBufferPointer) {
        let id = try r.u64()
        let count = Int(try r.u32())
        guard count <= r.maxBlobBytes else { throw WeftError.malformed }
        return (id, try r.rawSlice(count))
    }

    static func decode(opcode: HubOpcode, from r: inout ByteReader) throws -> HubRequest {
        switch opcode {
        case .openSession:
            return .openSession(agentName: try r.string(max: WireCodec.stringMaxBytes))
        case .closeSession:
            return .closeSession(try r.u64())
        case .status:
            return .status
        case .fsck:
            return .fsck(repair: try r.bool())
        case .fsckRemaining:
            return .fsckRemaining(repair: try r.bool())
        case .openVolumeSession:
            return .openVolumeSession(agentName: try r.string(max: WireCodec.stringMaxBytes),
                                      volume: try r.string(max: WireCodec.stringMaxBytes))
        case .clusterMap:
            return .clusterMap
        case .localReads:
            return .localReads
        case .ping:
            return .ping
        case .fence:
            return .fence(client: try r.u64(), connection: try r.u64())
        case .enableLeases:
            return .enableLeases(try r.u64())
        case .recall:
            let session = try r.u64(), ino = try r.u64(), notice = try r.bool()
            let count = try r.listCount(minimumElementBytes: 4)
            var names: [[UInt8]] = []
            names.reserveCapacity(count)
            for _ in 0..<count { names.append(try r.blob()) }
            return .recall(session: session, ino: ino, names: names, notice: notice)
        case .openDataSession:
            return .openDataSession(agentName: try r.string(max: WireCodec.stringMaxBytes),
                                    volume: try r.string(max: WireCodec.stringMaxBytes))
        case .fetchObject:
            return .fetchObject(id: try r.u64(), offset: try r.u32(), length: try r.u32())
        case .deleteObjects:
            return .deleteObjects(ids: try r.idList())
        case .createVolume:
            let name = try r.string(max: WireCodec.stringMaxBytes), home = try r.string(max: WireCodec.stringMaxBytes)
            let chunkSize = try r.u32()
            let raw = try r.u8()
            guard let compression = Compression(rawValue: raw) else { throw WeftError(EBADMSG, "unknown compression \(raw)") }
            return .createVolume(name: name, home: home, chunkSizeBytes: chunkSize, compression: compression)
        default:
            break
        }
        let c = try RequestContext.decode(from: &r)
        switch opcode {
        case .openSession, .closeSession, .status, .fsck, .fsckRemaining, .openVolumeSession, .clusterMap, .localReads, .createVolume, .ping, .fence,
             .enableLeases, .recall, .openDataSession, .fetchObject, .deleteObjects:
            preconditionFailure("handled above")
        case .acquireWriteLease:
            return .acquireWriteLease(c, ino: try r.u64())
        case .reclaimWriteLease:
            return .reclaimWriteLease(c, ino: try r.u64())
        case .lookup:
            return .lookup(c, parent: try r.u64(), name: try r.blob())
        case .unlink:
            return .unlink(c, parent: try r.u64(), name: try r.blob())
        case .unlinkEntry:
            return .unlinkEntry(c, parent: try r.u64(), name: try r.blob())
        case .rmdir:
            return .rmdir(c, parent: try r.u64(), name: try r.blob())
        case .getattr:
            return .getattr(c, ino: try r.u64())
        case .readlink:
            return .readlink(c, ino: try r.u64())
        case .release:
            return .release(c, ino: try r.u64())
        case .listxattr:
            return .listxattr(c, ino: try r.u64())
        case .setattr:
            return .setattr(c, ino: try r.u64(), try SetAttributes.decode(from: &r))
        case .create:
            return .create(c, parent: try r.u64(), name: try r.blob(), mode: try r.u32(), rdev: try r.u32(),
                           umask: try r.u32(), exclusive: try r.bool())
        case .createOpen:
            return .createOpen(c, parent: try r.u64(), name: try r.blob(), mode: try r.u32(), umask: try r.u32(),
                               flags: try r.i32(), writeLease: try r.bool())
        case .mkdir:
            return .mkdir(c, parent: try r.u64(), name: try r.blob(), mode: try r.u32(), umask: try r.u32())
        case .symlink:
            return .symlink(c, parent: try r.u64(), name: try r.blob(), target: try r.blob())
        case .link:
            return .link(c, ino: try r.u64(), newParent: try r.u64(), newName: try r.blob())
        case .rename:
            return .rename(c, parent: try r.u64(), name: try r.blob(), newParent: try r.u64(), newName: try r.blob(),
                           flags: RenameFlags(rawValue: try r.u32()))
        case .readdir:
            let ino = try r.u64()
            let after: [UInt8]? = try r.bool() ? try r.blob() : nil
            return .readdir(c, ino: ino, after: after, limit: try r.u32())
        case .access:
            return .access(c, ino: try r.u64(), mask: try r.u32())
        case .open:
            return .open(c, ino: try r.u64(), flags: try r.i32())
        case .getxattr:
            return .getxattr(c, ino: try r.u64(), name: try r.blob())
        case .removexattr:
            return .removexattr(c, ino: try r.u64(), name: try r.blob())
        case .setxattr:
            return .setxattr(c, ino: try r.u64(), name: try r.blob(), value: try r.blob(),
                             flags: XattrFlags(rawValue: try r.u32()))
        case .statfs:
            return .statfs(c)
        case .sync:
            return .sync(c)
        case .barrier:
            return .barrier(c, ino: try r.u64())
        case .syncFile:
            return .syncFile(c, ino: try r.u64())
        case .adoptObject:
            return .adoptObject(c, id: try r.u64(), tag: try r.u32())
        case .openLayout:
            return .openLayout(c, ino: try r.u64(), flags: try r.i32(), chunkCount: try r.u32(), dataMaxBytes: try r.u32())
        case .allocateSliceIDs:
            return .allocateSliceIDs(c, count: try r.u32())
        case .writeSlice:
            let (id, data) = try decodeWriteSliceTail(from: &r)
            return .writeSlice(c, id: id, data: Array(data))
        case .writeObject:
            let (id, image) = try decodeWriteSliceTail(from: &r)
            return .writeObject(c, id: id, image: Array(image))
        case .readSlice:
            return .readSlice(c, id: try r.u64(), offset: try r.u32(), length: try r.u32())
        case .layout:
            return .layout(c, ino: try r.u64(), firstChunk: try r.u32(), count: try r.u32())
        case .commitSlices:
            let ino = try r.u64()
            let count = try r.listCount(minimumElementBytes: 4 + Slice.encodedBytes)
            var slices: [SliceCommit] = []
            slices.reserveCapacity(count)
            for _ in 0..<count {
                slices.append(SliceCommit(chunkIndex: try r.u32(), slice: try Slice.decode(from: &r)))
            }
            return .commitSlices(c, ino: ino, slices: slices, minimumSize: try r.u64(), durable: try r.bool())
        case .lock:
            return .lock(c, ino: try r.u64(), try LockRequest.decode(from: &r))
        case .readSliceFrom:
            let id = try r.u64(), offset = try r.u32(), length = try r.u32()
            let count = try r.count(max: min(r.remaining / 2, Limits.holdersMax))
            var holders: [UInt16] = []
            holders.reserveCapacity(count)
            for _ in 0..<count { holders.append(try r.u16()) }
            return .readSliceFrom(c, id: id, offset: offset, length: length, holders: holders)
        case .releaseUploads:
            return .releaseUploads(c, ids: try r.idList())
        case .discardUploads:
            return .discardUploads(c, ids: try r.idList())
        case .releaseMany:
            return .releaseMany(c, inos: try r.idList())
        case .readBlocks:
            return .readBlocks(c, id: try r.u64(), firstBlock: try r.u32(), count: try r.u32())
        }
    }
}

extension ByteReader {
    /// A `list<u64>` of object ids.
    mutating func idList() throws -> [SliceID] {
        let count = try listCount(minimumElementBytes: 8)
        var ids: [SliceID] = []
        ids.reserveCapacity(count)
        for _ in 0..<count { ids.append(try u64()) }
        return ids
    }

    /// A list count, bounded by what the remaining bytes could hold, so that reserving capacity
    /// for it never allocates more than the frame's own size allows.
    mutating func listCount(minimumElementBytes: Int) throws -> Int {
        try count(max: remaining / minimumElementBytes)
    }
}
