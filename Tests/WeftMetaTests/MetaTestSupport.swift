#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import WeftTestSupport
import XCTest
import WeftProto
@testable import WeftMeta

/// Callers used across the metadata tests. `alice` and `bob` are ordinary users in separate groups.
enum Callers {
    static let root = Credentials.root
    static let alice = Credentials(uid: 1000, gid: 1000)
    static let bob = Credentials(uid: 1001, gid: 1001)
}

/// File type bits as `UInt32`, as `Attributes.mode` holds them.
enum FileType {
    static let regular = UInt32(S_IFREG)
    static let directory = UInt32(S_IFDIR)
    static let symlink = UInt32(S_IFLNK)
    static let fifo = UInt32(S_IFIFO)
    static let characterDevice = UInt32(S_IFCHR)
    static let setUID = UInt32(S_ISUID)
    static let setGID = UInt32(S_ISGID)
    static let sticky = UInt32(S_ISVTX)
}




/// A fresh volume per test in its own temporary directory, opened in strict durability and
/// removed in `tearDown`. Chunks are 64 KiB so that layouts cross chunk boundaries cheaply.
class MetaStoreTestCase: XCTestCase {
    static let chunkSizeBytes: UInt32 = 65536

    var directory: String!
    var store: MetaStore!
    let root = InodeNumbers.root

    var path: String { directory + "/meta" }

    override func setUpWithError() throws {
        try super.setUpWithError()
        directory = NSTemporaryDirectory() + "weft-meta-test-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let volume = VolumeInfo(formatVersion: 1, uuid: Array(repeating: 7, count: 16),
                                chunkSizeBytes: Self.chunkSizeBytes, compression: .none, createdNs: currentTimeNs())
        try MetaStore.format(path: path, volume: volume)
        store = try MetaStore(path: path, durability: .strict, logger: testLogger("weft.meta.test"))
    }

    override func tearDownWithError() throws {
        if let store { try? store.close() }
        store = nil
        if let directory { try? FileManager.default.removeItem(atPath: directory) }
        directory = nil
        try super.tearDownWithError()
    }

    /// Closes the store (making everything durable) and opens the volume again.
    func reopen() throws {
        try store.close()
        store = nil   // the last reference: RocksDB closes and drops its lock
        store = try MetaStore(path: path, durability: .strict, logger: testLogger("weft.meta.test"))
    }

    // MARK: shorthands (root unless told otherwise)

    @discardableResult
    func makeFile(_ name: String, in parent: InodeID? = nil, mode: UInt32 = 0o644,
                  as credentials: Credentials = Callers.root) throws -> Attributes {
        try store.create(credentials, parent: parent ?? root, name: bytes(name), mode: FileType.regular | mode,
                         rdev: 0, umask: 0, exclusive: true)
    }

    @discardableResult
    func makeDirectory(_ name: String, in parent: InodeID? = nil, mode: UInt32 = 0o755,
                       as credentials: Credentials = Callers.root) throws -> Attributes {
        try store.mkdir(credentials, parent: parent ?? root, name: bytes(name), mode: mode, umask: 0)
    }

    func lookup(_ name: String, in parent: InodeID? = nil) throws -> Attributes {
        try store.lookup(Callers.root, parent: parent ?? root, name: bytes(name))
    }

    /// Names of a directory's entries (without "." and ".."), in the order readdir gives them.
    func names(in directory: InodeID) throws -> [String] {
        var names: [String] = []
        var after: [UInt8]? = nil
        while true {
            let page = try store.readdir(Callers.root, ino: directory, after: after, limit: 1000)
            for entry in page where entry.name != [0x2E] && entry.name != [0x2E, 0x2E] {
                names.append(String(decoding: entry.name, as: UTF8.self))
            }
            guard let last = page.last else { break }
            after = last.name
        }
        return names
    }

    /// Gives `credentials` ownership of `ino` (as root).
    func chown(_ ino: InodeID, to credentials: Credentials) throws {
        _ = try store.setattr(Callers.root, ino: ino, SetAttributes(uid: credentials.uid, gid: credentials.gid))
    }

    func chmod(_ ino: InodeID, _ mode: UInt32) throws {
        _ = try store.setattr(Callers.root, ino: ino, SetAttributes(mode: mode))
    }

    /// A slice covering `[offset, offset+length)` of chunk `chunkIndex` from a fresh object.
    func slice(_ chunkIndex: UInt32, offset: UInt32, length: UInt32) throws -> SliceCommit {
        let id = try store.allocateSliceIDs(count: 1)
        return SliceCommit(chunkIndex: chunkIndex,
                           slice: Slice(id: id, offsetInChunk: offset, length: length, objectLength: length))
    }

    /// Fails the test if the metadata check finds any inconsistency.
    func assertConsistent(file: StaticString = #filePath, line: UInt = #line) throws {
        let check = try store.checkMetadata(repair: false)
        XCTAssertEqual(check.problems, [], "metadata check", file: file, line: line)
    }
}
