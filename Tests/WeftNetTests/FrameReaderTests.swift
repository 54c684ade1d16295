#if canImport(Glibc)
import Glibc
#endif
import Foundation
import NIOCore
import WeftTestSupport
import XCTest
import WeftProto
@testable import WeftNet

/// The hub's frame reader on a real socket pair (SPEC.md §4, Bulk transfers): frames come out
/// whole and in order however the stream is cut, and a large writeSlice that arrives in pieces
/// is received with its data on a page boundary, so the hub hands it to the store without a copy.
final class FrameReaderTests: XCTestCase {
    /// A flag one thread sets and another reads.
    private final class StopFlag: @unchecked Sendable {
        private let lock = NSLock()
        private var value = false
        var isSet: Bool { lock.lock(); defer { lock.unlock() }; return value }
        func set() { lock.lock(); value = true; lock.unlock() }
    }

    private let context = RequestContext(session: 7, credentials: Credentials(uid: 1000, gid: 1000, groups: [4, 27]))

    /// A stream socket pair; both ends close when the test ends.
    private func socketPair() throws -> (reading: Int32, writing: Int32) {
        var ends: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &ends) == 0 else { throw WeftError(errno, "socketpair") }
        addTeardownBlock { close(ends[0]); close(ends[1]) }
        return (ends[0], ends[1])
    }

    /// Writes `bytes` to `descriptor` in pieces of the given sizes (the last one repeats), from a
    /// thread of its own, pausing now and then so that the reader sees pieces apart. The thread is
    /// stopped and waited for when the test ends, before the descriptors close (a number reused by
    /// the next test must never get its bytes).
    private func send(_ bytes: [UInt8], to descriptor: Int32, pieces: [Int]) {
        let stop = StopFlag()
        let finished = DispatchSemaphore(value: 0)
        let thread = Thread {
            defer { finished.signal() }
            var done = 0, index = 0
            while done < bytes.count, !stop.isSet {
                let size = min(pieces[min(index, pieces.count - 1)], bytes.count - done)
                index += 1
                var sent = 0
                while sent < size {
                    let n = bytes.withUnsafeBytes { Glibc.send(descriptor, $0.baseAddress! + done + sent, size - sent, Int32(MSG_NOSIGNAL)) }
                    if n < 0 && errno == EINTR { continue }
                    if n <= 0 { return }
                    sent += n
                }
                done += size
                if index <= 32 || index % 512 == 0 { usleep(1_000) }
            }
        }
        thread.start()
        addTeardownBlock {
            stop.set()
            shutdown(descriptor, Int32(SHUT_RDWR))
            finished.wait()
        }
    }

    /// Reads frames as the hub's reading threads do (receive, then take the whole frames) until
    /// `count` have come out.
    private func readFrames(_ reader: inout FrameReader, from descriptor: Int32, count: Int) throws -> [InboundFrame] {
        var frames: [InboundFrame] = []
        let deadline = Date().addingTimeInterval(10)
        while frames.count < count {
            var watch = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
            if poll(&watch, 1, 100) == 0 {
                if Date() > deadline { throw WeftError(ETIMEDOUT, "\(frames.count) of \(count) frames") }
                continue
            }
            let (_, end) = reader.receive(descriptor, maxBytes: HubConnection.readTurnMaxBytes)
            frames += try reader.frames()
            if let end, frames.count < count { throw WeftError(EPIPE, "stream ended: \(end)") }
            if Date() > deadline { throw WeftError(ETIMEDOUT, "\(frames.count) of \(count) frames") }
        }
        return frames
    }

    private func writeSlice(id: UInt64, bytes: Int, seed: UInt64) -> (frame: [UInt8], data: [UInt8]) {
        var random = SeededRandom(seed: seed)
        var data = [UInt8](repeating: 0, count: bytes)
        data.withUnsafeMutableBytes { raw in
            for start in stride(from: 0, to: bytes, by: 8) {
                withUnsafeBytes(of: random.next()) { word in
                    for i in 0..<min(8, bytes - start) { raw[start + i] = word[i] }
                }
            }
        }
        return (WireCodec.encodeRequest(id: id, .writeSlice(context, id: 1000 + id, data: data)), data)
    }

    private func decoded(_ frame: InboundFrame) throws -> (HubRequest, dataAddress: Int) {
        try frame.payload.withUnsafeReadableBytes { raw in
            var reader = ByteReader(raw)
            let request = try HubRequest.decode(opcode: HubOpcode(rawValue: frame.header.opcode)!, from: &reader)
            var again = ByteReader(raw)
            _ = try RequestContext.decode(from: &again)
            let (_, data) = try HubRequest.decodeWriteSliceTail(from: &again)
            return (request, Int(bitPattern: data.baseAddress))
        }
    }

    func testALargeWriteSliceArrivingInPiecesComesOutWithItsDataOnAPageAndIsNotCopiedAgain() throws {
        let (reading, writing) = try socketPair()
        let small = WireCodec.encodeRequest(id: 1, .ping)
        let (big, data) = writeSlice(id: 2, bytes: 4 << 20, seed: 11)
        let after = WireCodec.encodeRequest(id: 3, .ping)
        // The ping and the big frame's first 100 bytes together, then 60 KiB pieces.
        send(small + big + after, to: writing, pieces: [small.count + 100, 60 * 1024])
        var reader = FrameReader(allocator: BulkMemory.allocator, bulkDataOffset: HubConnection.writeSliceDataOffset)
        let frames = try readFrames(&reader, from: reading, count: 3)

        XCTAssertEqual(frames.map(\.header.requestID), [1, 2, 3])
        let (request, address) = try decoded(frames[1])
        guard case .writeSlice(let c, let id, let received) = request else { return XCTFail("\(request)") }
        XCTAssertEqual(c, context)
        XCTAssertEqual(id, 1002)
        XCTAssertEqual(received, data)
        XCTAssertEqual(address % BulkMemory.pageBytes, 0, "the data was not received on a page boundary")
        // The hub's hand-off keeps the frame as it is: no second copy.
        let handed = try decoded(HubConnection.detachingBulk(frames[1]))
        XCTAssertEqual(handed.dataAddress, address)
    }

    func testWithoutPlacingTheHubStillAlignsALargeWriteSliceByCopyingIt() throws {
        let (reading, writing) = try socketPair()
        let (big, data) = writeSlice(id: 9, bytes: 1 << 20, seed: 12)
        send(big, to: writing, pieces: [100, 32 * 1024])
        var reader = FrameReader(allocator: BulkMemory.allocator)
        let frames = try readFrames(&reader, from: reading, count: 1)
        let (_, address) = try decoded(frames[0])
        let handed = HubConnection.detachingBulk(frames[0])
        let (request, handedAddress) = try decoded(handed)
        XCTAssertEqual(handedAddress % BulkMemory.pageBytes, 0)
        if address % BulkMemory.pageBytes != 0 { XCTAssertNotEqual(handedAddress, address) }
        guard case .writeSlice(_, _, let received) = request else { return XCTFail("\(request)") }
        XCTAssertEqual(received, data)
    }

    func testManyFramesInOneStreamComeOutWholeAndInOrderHoweverTheStreamIsCut() throws {
        // Small frames, large ones, and writeSlices under and over a block, cut at odd sizes, so
        // that whole frames are taken out while the reader still receives (a full buffer).
        for (round, piece) in [13, 4_093, 65_536, 300_000].enumerated() {
            let (reading, writing) = try socketPair()
            var stream: [UInt8] = []
            var expected: [(UInt64, [UInt8]?)] = []
            var random = SeededRandom(seed: UInt64(round) + 40)
            for id in UInt64(1)...60 {
                if id % 3 == 0 {
                    let size = [100, 65_535, 65_536, 200_000, 1 << 20][Int.random(in: 0..<5, using: &random)]
                    let (frame, data) = writeSlice(id: id, bytes: size, seed: id)
                    stream += frame
                    expected.append((id, data))
                } else {
                    stream += WireCodec.encodeRequest(id: id, .ping)
                    expected.append((id, nil))
                }
            }
            send(stream, to: writing, pieces: [piece])
            var reader = FrameReader(allocator: BulkMemory.allocator, bulkDataOffset: HubConnection.writeSliceDataOffset)
            let frames = try readFrames(&reader, from: reading, count: expected.count)
                XCTAssertEqual(frames.map(\.header.requestID), expected.map(\.0), "pieces of \(piece)")
            for (frame, (id, data)) in zip(frames, expected) {
                let request = try frame.payload.withUnsafeReadableBytes { raw -> HubRequest in
                    var r = ByteReader(raw)
                    return try HubRequest.decode(opcode: HubOpcode(rawValue: frame.header.opcode)!, from: &r)
                }
                if let data {
                    guard case .writeSlice(_, _, let received) = request else { return XCTFail("frame \(id): \(request)") }
                    XCTAssertEqual(received, data, "frame \(id), pieces of \(piece)")
                    if data.count >= Limits.blockSizeBytes {
                        XCTAssertEqual(try decoded(HubConnection.detachingBulk(frame)).dataAddress % BulkMemory.pageBytes, 0,
                                       "frame \(id), pieces of \(piece)")
                    }
                } else {
                    guard case .ping = request else { return XCTFail("frame \(id): \(request)") }
                }
            }
            XCTAssertEqual(reader.bufferedBytes, 0)
        }
    }

    /// Writes sent back to back, as an agent streaming a file sends them: each frame's buffer
    /// takes nothing of the next frame, so what is copied between buffers is at most the head
    /// read of each (before, up to half of every frame when reads were full).
    func testBackToBackWriteSlicesAreReceivedInPlaceWithLittleCopied() throws {
        let (reading, writing) = try socketPair()
        var stream: [UInt8] = []
        var sent: [[UInt8]] = []
        for id in UInt64(1)...12 {
            let (frame, data) = writeSlice(id: id, bytes: (1 << 20) - Int(id) * 4096, seed: id + 90)
            stream += frame
            sent.append(data)
        }
        var reader = FrameReader(allocator: BulkMemory.allocator, bulkDataOffset: HubConnection.writeSliceDataOffset)
        send(stream, to: writing, pieces: [stream.count])
        usleep(50_000)   // most of it waiting in the socket: full reads
        let frames = try readFrames(&reader, from: reading, count: sent.count)
        XCTAssertEqual(frames.map(\.header.requestID), Array(UInt64(1)...12))
        for (frame, data) in zip(frames, sent) {
            let (request, address) = try decoded(frame)
            guard case .writeSlice(_, _, let received) = request else { return XCTFail("\(request)") }
            XCTAssertEqual(received, data)
            XCTAssertEqual(address % BulkMemory.pageBytes, 0, "frame \(frame.header.requestID) was not placed")
        }
        XCTAssertLessThanOrEqual(reader.movedBytes, sent.count * FrameReader.headReadBytes)
    }

    /// A frame with a bad header after enough good ones that the reader splits while it still
    /// receives: the stream is refused (EPROTO), never read on cut in the wrong places.
    func testABadFrameAfterGoodFramesIsRefused() throws {
        for bad in [[0xff, 0xff, 0xff, 0xff] + [UInt8](repeating: 1, count: 64),   // a length over the limit
                    Array(WireCodec.encodeRequest(id: 9, .ping).enumerated().map { $0.offset == 4 ? 3 : $0.element })] {  // version 3
            let (reading, writing) = try socketPair()
            var stream: [UInt8] = []
            for id in UInt64(1)...6000 { stream += WireCodec.encodeRequest(id: id, .ping) }
            XCTAssertGreaterThan(stream.count, 64 * 1024)
            stream += bad + WireCodec.encodeRequest(id: 7000, .ping)
            send(stream, to: writing, pieces: [stream.count])
            usleep(20_000)
            var reader = FrameReader(allocator: BulkMemory.allocator, bulkDataOffset: HubConnection.writeSliceDataOffset)
            XCTAssertErrno(EPROTO, try readFrames(&reader, from: reading, count: 6002))
        }
    }
}
