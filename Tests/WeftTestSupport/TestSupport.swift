import Foundation
import Logging
import WeftProto
import XCTest

/// Deterministic generator (SplitMix64); tests that use it print their seed on failure.
public struct SeededRandom: RandomNumberGenerator {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// `count` pseudo-random bytes.
    public mutating func bytes(_ count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var index = 0
        while index < count {
            var word = next()
            for _ in 0..<8 where index < count {
                out[index] = UInt8(truncatingIfNeeded: word)
                word >>= 8
                index += 1
            }
        }
        return out
    }
}

/// The bytes of a name.
public func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }

/// Asserts that `expression` throws a `WeftError` carrying `expected`.
public func XCTAssertErrno<T>(_ expected: Int32, _ expression: @autoclosure () throws -> T, _ message: String = "",
                              file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertThrowsError(try expression(), message, file: file, line: line) { error in
        XCTAssertEqual((error as? WeftError)?.errno, expected,
                       "expected \(String(cString: strerror(expected))), got \(error) \(message)",
                       file: file, line: line)
    }
}

/// A quiet logger (set WEFT_TEST_LOG to see everything).
public func testLogger(_ label: String) -> Logger {
    var logger = Logger(label: label)
    logger.logLevel = ProcessInfo.processInfo.environment["WEFT_TEST_LOG"] != nil ? .trace : .critical
    return logger
}

/// Polls `condition` every 10 ms until it holds or `timeoutSeconds` pass; returns whether it held.
public func eventually(timeoutSeconds: Double = 10, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date().addingTimeInterval(timeoutSeconds)
    while Date() < deadline {
        if try condition() { return true }
        usleep(10_000)
    }
    return try condition()
}

/// Exactly `count` bytes received from socket `descriptor`, or nil when it ends, fails or
/// times out first.
public func receiveFully(_ descriptor: Int32, _ count: Int) -> [UInt8]? {
    var bytes = [UInt8](repeating: 0, count: count)
    var done = 0
    while done < count {
        let n = bytes.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress! + done, count - done, 0) }
        if n <= 0 { return nil }
        done += n
    }
    return bytes
}
